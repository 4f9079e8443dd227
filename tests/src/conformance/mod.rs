//! The policy conformance runner (../shared/conformance/FORMAT.md).
//!
//! Every pod of a case is a real network namespace wired by the `palisade`
//! CNI binary inside a per-case "node" namespace; the agent runs there in
//! standalone mode on a manifest directory (namespaces, pods, policies, one
//! object per file, rewritten atomically); each pod serves its ports; every
//! cell of an expected matrix is a real connection attempt from the source
//! pod's namespace, all cells of a step at once.
//!
//! Decisions the format leaves open:
//! - Within a step, `delete` is applied first, then `apply`, then `relabel`;
//!   then the agent is asked to Sync (it answers once the result is in the
//!   kernel) and the step's probes run. Steps are numbered from 1.
//! - A pod's probe to itself is probed like any other cell.
//! - SCTP cells are skipped (never passed) when the kernel cannot open an
//!   SCTP socket. A case passes when every cell that was probed matches; a
//!   case whose every cell was skipped is reported as `SKIP name` and counted
//!   in `K skipped` on the last line; the number of skipped probes is printed
//!   under each case and before the last line.
//! - Under each case a line gives its steps, probes and duration; under a
//!   failure each mismatching cell is followed by the flow-log records of
//!   that connection (`flow: DROP ...`), which say where and why.
//! - `--ip-family ipv6|dual`: how pods get IPv6 addresses, which family a
//!   probe runs over and what is refused is in [`family`]; a mismatch line
//!   then ends with the family (`... saw X over IPv6`).
//! - FORMAT v2 `cluster.dns` / `cluster.external` (issue 16): the DNS pod
//!   is an ordinary pod (added to the case's pods unless listed there),
//!   whose UDP and TCP 53 answer from a zone of the external names
//!   ([`dns`]); anything else sent there is served as by every pod. The
//!   hosts outside the cluster share one namespace behind the node (a veth
//!   from the single node; with several nodes a port on the fabric, routed
//!   by every node), each serving its own ports on its own address, IPv4
//!   and, under `--ip-family ipv6|dual`, the address's mirror (AAAA).
//!   Pod traffic to them is not translated. A matrix column without `/`
//!   is a name: the source pod resolves it (UDP, 1 s, one retry, TCP when
//!   truncated; A or AAAA by the probe's family) at the DNS pod's address,
//!   or with `--via-services` at the ClusterIP of `kube-system/kube-dns`
//!   (10.96.0.2 / fd00:96::2, 53/UDP `dns` and 53/TCP `dns-tcp`), then
//!   probes the address it got; a name the case does not list gets
//!   NXDOMAIN, and any failed resolution is a failed cell (`dns: ...`
//!   under a mismatch says why). The agents get `--cluster-dns
//!   NAMESPACE/KEY=VALUE,...` only when the DNS pod is not in kube-system
//!   with label k8s-app=kube-dns (their default).
pub mod case;
pub mod cluster;
pub mod dns;
pub mod family;
pub mod flows;
pub mod matrix;
pub mod nodes;
pub mod placeholder;
pub mod probe;
pub mod runner;
pub mod services;
pub mod signal;
