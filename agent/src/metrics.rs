//! The agent's Prometheus metrics, kept with `prometheus-client` and
//! rendered in the OpenMetrics text format (which Prometheus scrapes
//! natively; `CONTENT_TYPE`). Two sources meet at scrape time:
//!
//! - the agent's own counters, gauges and latency histograms (`Metrics`),
//!   updated where things happen (compile, map sync, sources, flow log);
//! - the kernel's view (`KernelStats`: per-CPU verdict counters, XDP
//!   counters, map fill), read from the maps when a scrape asks and passed
//!   to `Metrics::render`.
//!
//! Families (names as scraped; counters end in `_total`):
//! `palisade_policy_rejections_total`, `palisade_policies_rejected`,
//! `palisade_map_sync_errors_total`, `palisade_map_full_errors_total{map}`,
//! `palisade_source_errors_total`, `palisade_programmed_generation`,
//! `palisade_flow_records_total`, `palisade_policy_compile_seconds`,
//! `palisade_map_sync_seconds` (histograms), `palisade_verify_mismatches`,
//! `palisade_verify_runs_total`, `palisade_policy_decisions_total{tier,action}`
//! (from flow records); from the kernel
//! `palisade_endpoints`, `palisade_verdicts_total{verdict,reason}`,
//! `palisade_drops_total{reason}`, `palisade_xdp_packets_total{outcome}`,
//! `palisade_map_entries{map}`, `palisade_map_capacity{map}`,
//! `palisade_service_translations_total`; `palisade_service_frontends`;
//! `palisade_registration_refusals_total{kind}`.
use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{text, EncodeLabelSet},
    metrics::{counter, family::Family, gauge, histogram},
    registry::Registry,
};

/// The `Content-Type` of `Metrics::render`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets (seconds) of the compile and map-sync histograms.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A monotonic counter (clones share the value).
#[derive(Clone, Default, Debug)]
pub struct Counter(counter::Counter<u64>);

impl Counter {
    pub fn inc(&self) {
        self.0.inc();
    }
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A gauge of a count (clones share the value).
#[derive(Clone, Default, Debug)]
pub struct Gauge(gauge::Gauge<u64, AtomicU64>);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.set(v);
    }
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

/// A counter per datapath map (the `map` label).
#[derive(Clone, Default, Debug)]
pub struct LabeledCounter(Family<MapLabel, counter::Counter<u64>>);

impl LabeledCounter {
    pub fn inc_label(&self, map: &str) {
        self.0
            .get_or_create(&MapLabel {
                map: map.to_string(),
            })
            .inc();
    }
    pub fn get(&self, map: &str) -> u64 {
        self.0
            .get_or_create(&MapLabel {
                map: map.to_string(),
            })
            .get()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// A counter per API error kind (the `kind` label).
#[derive(Clone, Default, Debug)]
pub struct KindCounter(Family<KindLabel, counter::Counter<u64>>);

impl KindCounter {
    pub fn inc(&self, kind: &str) {
        self.0
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }
    pub fn get(&self, kind: &str) -> u64 {
        self.0
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .get()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabel {
    family: &'static str,
    verdict: String,
}

/// Flow records by address family and verdict.
#[derive(Clone, Default, Debug)]
pub struct FamilyCounter(Family<FamilyLabel, counter::Counter<u64>>);

impl FamilyCounter {
    pub fn count(&self, rec: &crate::flowlog::FlowRecord) {
        self.0
            .get_or_create(&Self::label(rec.src.ip.is_ipv6(), &rec.verdict))
            .inc();
    }
    pub fn get(&self, ipv6: bool, verdict: &str) -> u64 {
        self.0.get_or_create(&Self::label(ipv6, verdict)).get()
    }
    fn label(ipv6: bool, verdict: &str) -> FamilyLabel {
        FamilyLabel {
            family: if ipv6 { "ipv6" } else { "ipv4" },
            verdict: verdict.to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabel {
    tier: String,
    action: String,
}

/// Flow records by the tier and action that decided them
/// (`palisade_policy_decisions_total{tier,action}`), and the Pass rules
/// they went through (`action="Pass"`, by the Pass rule's tier).
#[derive(Clone, Default, Debug)]
pub struct DecisionCounter(Family<DecisionLabel, counter::Counter<u64>>);

impl DecisionCounter {
    pub fn inc(&self, tier: &str, action: &str) {
        self.0
            .get_or_create(&DecisionLabel {
                tier: tier.to_string(),
                action: action.to_string(),
            })
            .inc();
    }
    pub fn get(&self, tier: &str, action: &str) -> u64 {
        self.0
            .get_or_create(&DecisionLabel {
                tier: tier.to_string(),
                action: action.to_string(),
            })
            .get()
    }
    /// Counts what a flow record says decided it.
    pub fn count(&self, rec: &crate::flowlog::FlowRecord) {
        for t in &rec.passed_tiers {
            self.inc(t, crate::flowlog::decision::PASS);
        }
        if let (Some(t), Some(a)) = (&rec.tier, &rec.action) {
            self.inc(t, a);
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabel {
    namespace: String,
}

/// Events the kernel left out by the per-endpoint budget, by the
/// endpoint's namespace (one series per namespace, not per pod: a label
/// per pod would grow with pod churn), from the `suppressed` part of flow
/// records: `palisade_drop_events_suppressed_total{namespace}` and
/// `palisade_flow_events_suppressed_total{namespace}`.
#[derive(Clone, Default, Debug)]
pub struct SuppressedCounter {
    drops: Family<NamespaceLabel, counter::Counter<u64>>,
    flows: Family<NamespaceLabel, counter::Counter<u64>>,
}

impl SuppressedCounter {
    pub fn count(&self, rec: &crate::flowlog::FlowRecord) {
        let Some(s) = &rec.suppressed else {
            return;
        };
        let l = NamespaceLabel {
            namespace: rec
                .endpoint
                .split_once('/')
                .map_or("unknown", |(ns, _)| ns)
                .to_string(),
        };
        self.drops.get_or_create(&l).inc_by(s.drops as u64);
        self.flows.get_or_create(&l).inc_by(s.flows as u64);
    }
    pub fn drops(&self, namespace: &str) -> u64 {
        self.drops
            .get_or_create(&NamespaceLabel {
                namespace: namespace.into(),
            })
            .get()
    }
}

/// A latency histogram in seconds, `LATENCY_BUCKETS`.
#[derive(Clone, Debug)]
pub struct Histogram(histogram::Histogram);

impl Default for Histogram {
    fn default() -> Self {
        Self(histogram::Histogram::new(LATENCY_BUCKETS))
    }
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        self.0.observe(seconds);
    }
}

/// The agent's own metrics. Share it as `Arc<Metrics>`; every field is
/// updated lock-free.
#[derive(Debug)]
pub struct Metrics {
    pub compile_seconds: Histogram,
    pub sync_seconds: Histogram,
    /// A registration's work in the agent besides the attach: compile of
    /// that endpoint and its map writes.
    pub registration_program_seconds: Histogram,
    /// Attaching a registered pod's programs (kernel time, mostly RCU).
    pub registration_attach_seconds: Histogram,
    pub policy_rejections: Counter,
    pub policies_rejected: Gauge,
    pub sync_errors: Counter,
    pub map_full: LabeledCounter,
    pub source_errors: Counter,
    pub programmed_generation: Gauge,
    pub flow_records: Counter,
    /// Flow records by address family and verdict
    /// (`palisade_flow_records_by_family_total{family,verdict}`).
    pub flow_families: FamilyCounter,
    /// Service frontends (ClusterIP:port/protocol) translated in the kernel.
    pub services_programmed: Gauge,
    /// Probes whose kernel verdict differed from the model's in the last
    /// `verify` run, and verify runs (`palisade-agent verify`, periodic).
    pub verify_mismatches: Gauge,
    pub verify_runs: Counter,
    pub service_rejections: Counter,
    pub services_rejected: Gauge,
    /// Flow records by deciding tier and action.
    pub policy_decisions: DecisionCounter,
    /// Events left out by the kernel's per-endpoint budget.
    pub events_suppressed: SuppressedCounter,
    /// CNI registrations refused, by error kind (e.g. `unsupported`: an
    /// IPv6-only pod).
    pub registration_refusals: KindCounter,
    /// Egress by domain name (`crate::fqdn`).
    pub dns: DnsMetrics,
    /// The fields above, registered (the registry holds clones).
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let (compile_seconds, sync_seconds) = (Histogram::default(), Histogram::default());
        let (registration_program_seconds, registration_attach_seconds) =
            (Histogram::default(), Histogram::default());
        let (policy_rejections, sync_errors, source_errors, flow_records) = (
            Counter::default(),
            Counter::default(),
            Counter::default(),
            Counter::default(),
        );
        let (policies_rejected, programmed_generation) = (Gauge::default(), Gauge::default());
        let map_full = LabeledCounter::default();
        let services_programmed = Gauge::default();
        let (verify_mismatches, verify_runs) = (Gauge::default(), Counter::default());
        let (service_rejections, services_rejected) = (Counter::default(), Gauge::default());
        let policy_decisions = DecisionCounter::default();
        let events_suppressed = SuppressedCounter::default();

        // Help texts get their final "." from the registry.
        let mut r = Registry::default();
        r.register(
            "palisade_policy_rejections",
            "Policies rejected by the compiler (each rejection once)",
            policy_rejections.0.clone(),
        );
        r.register(
            "palisade_policies_rejected",
            "Policies currently rejected",
            policies_rejected.0.clone(),
        );
        r.register(
            "palisade_service_rejections",
            "Services or EndpointSlices (or parts of them) rejected (each rejection once)",
            service_rejections.0.clone(),
        );
        r.register(
            "palisade_services_rejected",
            "Service and EndpointSlice rejections currently in force",
            services_rejected.0.clone(),
        );
        r.register(
            "palisade_map_sync_errors",
            "Map syncs that stopped on an error",
            sync_errors.0.clone(),
        );
        r.register(
            "palisade_map_full_errors",
            "Writes refused because a map was full",
            map_full.0.clone(),
        );
        r.register(
            "palisade_source_errors",
            "Objects or manifests the source could not read",
            source_errors.0.clone(),
        );
        r.register(
            "palisade_programmed_generation",
            "Changes that have reached the kernel maps",
            programmed_generation.0.clone(),
        );
        r.register(
            "palisade_flow_records",
            "Flow log records written",
            flow_records.0.clone(),
        );
        r.register(
            "palisade_policy_decisions",
            "Flow records by the tier (Admin, NetworkPolicy, Baseline, default) and action (Accept, Deny) that decided them; Pass: the Pass rules they went through, by tier",
            policy_decisions.0.clone(),
        );
        r.register(
            "palisade_drop_events_suppressed",
            "Drop events the kernel left out of the flow log (over the endpoint's event budget; each later record says how many), by namespace",
            events_suppressed.drops.clone(),
        );
        r.register(
            "palisade_flow_events_suppressed",
            "New-flow events the kernel left out of the flow log (over the endpoint's event budget), by namespace",
            events_suppressed.flows.clone(),
        );
        r.register(
            "palisade_service_frontends",
            "Service frontends (ClusterIP:port/protocol) translated in the kernel",
            services_programmed.0.clone(),
        );
        r.register(
            "palisade_policy_compile_seconds",
            "Time to compile the model into map contents",
            compile_seconds.0.clone(),
        );
        r.register(
            "palisade_map_sync_seconds",
            "Time to write a compiled change into the kernel maps",
            sync_seconds.0.clone(),
        );
        r.register(
            "palisade_registration_program_seconds",
            "Agent-side work of a CNI registration besides the attach (the endpoint's entries into the maps)",
            registration_program_seconds.0.clone(),
        );
        r.register(
            "palisade_registration_attach_seconds",
            "Time to attach a registered pod's programs",
            registration_attach_seconds.0.clone(),
        );
        r.register(
            "palisade_verify_mismatches",
            "Probes whose kernel verdict differed from the model's in the last verify run",
            verify_mismatches.0.clone(),
        );
        r.register(
            "palisade_verify_runs",
            "Verify runs (kernel verdicts probed against the model)",
            verify_runs.0.clone(),
        );
        let registration_refusals = KindCounter::default();
        r.register(
            "palisade_registration_refusals",
            "CNI registrations the agent refused, by error kind",
            registration_refusals.0.clone(),
        );
        let dns = DnsMetrics::default();
        dns.register(&mut r);
        let flow_families = FamilyCounter::default();
        r.register(
            "palisade_flow_records_by_family",
            "Flow log records by address family (ipv4, ipv6) and verdict",
            flow_families.0.clone(),
        );
        Self {
            compile_seconds,
            sync_seconds,
            registration_program_seconds,
            registration_attach_seconds,
            policy_rejections,
            policies_rejected,
            sync_errors,
            map_full,
            source_errors,
            programmed_generation,
            flow_records,
            flow_families,
            services_programmed,
            verify_mismatches,
            verify_runs,
            service_rejections,
            services_rejected,
            policy_decisions,
            events_suppressed,
            registration_refusals,
            dns,
            registry: r,
        }
    }
}

/// Held DNS answers and what was learned from them (`crate::fqdn`).
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    /// From the datapath taking an answer to sending it on.
    pub hold_seconds: Histogram,
    pub answers_held: Counter,
    /// Answers sent on before the learned addresses were programmed.
    pub hold_timeouts: Counter,
    /// Held frames that held no DNS answer the agent could read (sent on).
    pub unreadable: Counter,
    pub addresses_learned: Counter,
    /// Addresses held now, over all names.
    pub learned_addresses: Gauge,
    /// Addresses evicted by the per-name cap, and refused by the node's.
    pub name_cap_evictions: Counter,
    pub node_cap_refusals: Counter,
    pub expired: Counter,
}

impl DnsMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "palisade_dns_hold_seconds",
            "Time a DNS answer to a pod with domain rules was held (learning and programming its addresses)",
            self.hold_seconds.0.clone(),
        );
        r.register(
            "palisade_dns_answers_held",
            "DNS answers held for a pod with domain rules",
            self.answers_held.0.clone(),
        );
        r.register(
            "palisade_dns_hold_timeouts",
            "Held DNS answers sent on before their addresses were programmed (hold timeout)",
            self.hold_timeouts.0.clone(),
        );
        r.register(
            "palisade_dns_unreadable",
            "Held frames without a DNS answer the agent could read (sent on, nothing learned)",
            self.unreadable.0.clone(),
        );
        r.register(
            "palisade_dns_addresses_learned",
            "Addresses learned for domain names (new for their name)",
            self.addresses_learned.0.clone(),
        );
        r.register(
            "palisade_dns_learned_addresses",
            "Addresses held for domain names now",
            self.learned_addresses.0.clone(),
        );
        r.register(
            "palisade_dns_name_cap_evictions",
            "Learned addresses evicted because their name held its cap",
            self.name_cap_evictions.0.clone(),
        );
        r.register(
            "palisade_dns_node_cap_refusals",
            "Addresses not learned because the node held its cap",
            self.node_cap_refusals.0.clone(),
        );
        r.register(
            "palisade_dns_expired",
            "Learned addresses forgotten after their TTL",
            self.expired.0.clone(),
        );
    }
}

/// Values read from the kernel at scrape time.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct KernelStats {
    /// (reason name, is drop, packets)
    pub reasons: Vec<(&'static str, bool, u64)>,
    /// (outcome name, packets) of the XDP prefilter.
    pub xdp: Vec<(&'static str, u64)>,
    /// (map, entries, capacity)
    pub maps: Vec<(String, u64, u64)>,
    /// Local endpoints registered.
    pub endpoints: u64,
    /// Endpoints holding their whole conntrack or fragment budget, as of
    /// the last GC pass.
    pub conntrack_over_budget: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

type CounterFamily<L> = Family<L, counter::Counter<u64>>;
type GaugeFamily<L> = Family<L, gauge::Gauge<u64, AtomicU64>>;

/// The kernel's families, built for one scrape from absolute values.
fn kernel_registry(k: &KernelStats) -> Registry {
    let mut r = Registry::default();
    let endpoints = gauge::Gauge::<u64, AtomicU64>::default();
    endpoints.set(k.endpoints);
    r.register(
        "palisade_endpoints",
        "Local endpoints registered",
        endpoints,
    );

    let (verdicts, drops) = (
        CounterFamily::<VerdictLabels>::default(),
        CounterFamily::<ReasonLabel>::default(),
    );
    let translations = counter::Counter::<u64, AtomicU64>::default();
    let untracked = counter::Counter::<u64, AtomicU64>::default();
    for &(reason, drop, n) in &k.reasons {
        // Bookkeeping, not a verdict: the flow's verdict is counted apart.
        if reason == palisade_common::reason::name(palisade_common::reason::SVC_TRANSLATED) {
            translations.inc_by(n);
            continue;
        }
        if reason == palisade_common::reason::name(palisade_common::reason::CT_BUDGET_UNTRACKED) {
            untracked.inc_by(n);
            continue;
        }
        let verdict = if drop { "drop" } else { "allow" };
        verdicts
            .get_or_create(&VerdictLabels { verdict, reason })
            .inc_by(n);
        if drop {
            drops.get_or_create(&ReasonLabel { reason }).inc_by(n);
        }
    }
    r.register(
        "palisade_verdicts",
        "Packets by verdict reason, from the kernel's per-CPU counters",
        verdicts,
    );
    r.register("palisade_drops", "Dropped packets by reason", drops);
    r.register(
        "palisade_service_translations",
        "New flows translated from a Service ClusterIP to a backend (no-backend refusals are palisade_drops_total{reason=\"no-service-backend\"})",
        translations,
    );

    r.register(
        "palisade_conntrack_budget_untracked",
        "New flows and first fragments passed without a conntrack entry because their pod had spent its conntrack budget (flows that need one are dropped: palisade_drops_total{reason=\"conntrack-budget\"})",
        untracked,
    );
    let over = gauge::Gauge::<u64, AtomicU64>::default();
    over.set(k.conntrack_over_budget);
    r.register(
        "palisade_conntrack_over_budget_endpoints",
        "Local endpoints holding their whole conntrack or fragment budget (last GC pass)",
        over,
    );

    let xdp = CounterFamily::<OutcomeLabel>::default();
    for &(outcome, n) in &k.xdp {
        xdp.get_or_create(&OutcomeLabel { outcome }).inc_by(n);
    }
    r.register(
        "palisade_xdp_packets",
        "XDP prefilter packets by outcome",
        xdp,
    );

    let (entries, capacity) = (
        GaugeFamily::<MapLabel>::default(),
        GaugeFamily::<MapLabel>::default(),
    );
    for (map, n, cap) in &k.maps {
        let l = MapLabel { map: map.clone() };
        entries.get_or_create(&l).set(*n);
        capacity.get_or_create(&l).set(*cap);
    }
    r.register(
        "palisade_map_entries",
        "Entries in each datapath map",
        entries,
    );
    r.register(
        "palisade_map_capacity",
        "Maximum entries of each datapath map",
        capacity,
    );
    r
}

impl Metrics {
    /// The exposition (`CONTENT_TYPE`): the agent's metrics, then the
    /// kernel's from `k`, then `# EOF`.
    pub fn render(&self, k: &KernelStats) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail, and the registries hold only
        // metrics whose encoders do not fail.
        let _ = text::encode_registry(&mut out, &self.registry)
            .and_then(|()| text::encode_registry(&mut out, &kernel_registry(k)))
            .and_then(|()| text::encode_eof(&mut out));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line that is exactly `series` (name and
    /// labels).
    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_string)
    }

    fn kernel() -> KernelStats {
        KernelStats {
            reasons: vec![
                ("no-policy-match", true, 5),
                ("policy-allow", false, 9),
                ("no-service-backend", true, 2),
                ("service-translated", false, 11),
                ("conntrack-budget-untracked", false, 4),
            ],
            xdp: vec![("xdp-denylist", 3), ("xdp-pass", 40)],
            maps: vec![("policy".into(), 10, 100), ("ipcache".into(), 4, 1024)],
            endpoints: 2,
            conntrack_over_budget: 1,
        }
    }

    #[test]
    fn histograms_have_cumulative_latency_buckets() {
        let m = Metrics::default();
        m.compile_seconds.observe(0.002);
        m.compile_seconds.observe(0.2);
        m.sync_seconds.observe(7.0);
        let s = m.render(&KernelStats::default());
        assert!(
            s.contains("# TYPE palisade_policy_compile_seconds histogram"),
            "{s}"
        );
        let c = |series: &str| sample(&s, series);
        let b = |le: &str| {
            c(&format!(
                "palisade_policy_compile_seconds_bucket{{le=\"{le}\"}}"
            ))
        };
        assert_eq!(b("0.001").as_deref(), Some("0"), "{s}");
        assert_eq!(b("0.0025").as_deref(), Some("1"), "{s}");
        assert_eq!(b("0.25").as_deref(), Some("2"), "{s}");
        assert_eq!(b("+Inf").as_deref(), Some("2"), "{s}");
        assert_eq!(
            c("palisade_policy_compile_seconds_count").as_deref(),
            Some("2")
        );
        assert_eq!(
            c("palisade_policy_compile_seconds_sum").as_deref(),
            Some("0.202")
        );
        assert_eq!(
            c("palisade_map_sync_seconds_bucket{le=\"5.0\"}").as_deref(),
            Some("0"),
            "{s}"
        );
        assert_eq!(
            c("palisade_map_sync_seconds_bucket{le=\"+Inf\"}").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn counters_and_gauges_keep_their_names() {
        let m = Metrics::default();
        m.policy_rejections.inc();
        m.policy_rejections.inc();
        m.policies_rejected.set(1);
        m.sync_errors.inc();
        m.source_errors.add(3);
        m.programmed_generation.set(42);
        m.flow_records.add(7);
        m.map_full.inc_label("POLICY");
        let s = m.render(&KernelStats::default());
        for (series, v) in [
            ("palisade_policy_rejections_total", "2"),
            ("palisade_policies_rejected", "1"),
            ("palisade_map_sync_errors_total", "1"),
            ("palisade_source_errors_total", "3"),
            ("palisade_programmed_generation", "42"),
            ("palisade_flow_records_total", "7"),
            ("palisade_map_full_errors_total{map=\"POLICY\"}", "1"),
        ] {
            assert_eq!(sample(&s, series).as_deref(), Some(v), "{series}\n{s}");
        }
        assert!(
            s.contains("# TYPE palisade_policy_rejections counter"),
            "{s}"
        );
        assert!(s.contains("# TYPE palisade_policies_rejected gauge"), "{s}");
        assert!(
            s.contains("# HELP palisade_flow_records Flow log records written.\n"),
            "{s}"
        );
        assert_eq!(m.map_full.get("POLICY"), 1);
        assert_eq!(m.source_errors.get(), 3);
        // Flow records by family and verdict.
        let mut r = crate::flowlog::FlowRecord {
            verdict: "DROP".into(),
            ..Default::default()
        };
        m.flow_families.count(&r);
        r.src.ip = "fd00::1".parse().unwrap();
        m.flow_families.count(&r);
        m.flow_families.count(&r);
        assert_eq!(
            (
                m.flow_families.get(false, "DROP"),
                m.flow_families.get(true, "DROP")
            ),
            (1, 2)
        );
        let s = m.render(&KernelStats::default());
        assert_eq!(
            sample(
                &s,
                "palisade_flow_records_by_family_total{family=\"ipv6\",verdict=\"DROP\"}"
            )
            .as_deref(),
            Some("2"),
            "{s}"
        );
        assert!(s.ends_with("# EOF\n"), "{s}");
        assert_eq!(s.matches("# EOF").count(), 1);
    }

    #[test]
    fn suppressed_events_are_counted_by_namespace() {
        let m = Metrics::default();
        let rec = crate::flowlog::FlowRecord {
            endpoint: "noisy/flooder".into(),
            suppressed: Some(crate::flowlog::Suppressed {
                drops: 500,
                drop_reasons: vec!["deny-rule".into()],
                flows: 3,
            }),
            ..Default::default()
        };
        m.events_suppressed.count(&rec);
        m.events_suppressed.count(&crate::flowlog::FlowRecord {
            endpoint: "noisy/flooder".into(),
            ..Default::default()
        });
        assert_eq!(m.events_suppressed.drops("noisy"), 500);
        let s = m.render(&KernelStats::default());
        for (series, v) in [
            (
                "palisade_drop_events_suppressed_total{namespace=\"noisy\"}",
                "500",
            ),
            (
                "palisade_flow_events_suppressed_total{namespace=\"noisy\"}",
                "3",
            ),
        ] {
            assert_eq!(sample(&s, series).as_deref(), Some(v), "{series}\n{s}");
        }
    }

    #[test]
    fn kernel_counters_and_map_fill_come_from_the_scrape() {
        let m = Metrics::default();
        let s = m.render(&kernel());
        for (series, v) in [
            ("palisade_endpoints", "2"),
            ("palisade_drops_total{reason=\"no-policy-match\"}", "5"),
            (
                "palisade_verdicts_total{verdict=\"drop\",reason=\"no-policy-match\"}",
                "5",
            ),
            (
                "palisade_verdicts_total{verdict=\"allow\",reason=\"policy-allow\"}",
                "9",
            ),
            ("palisade_xdp_packets_total{outcome=\"xdp-denylist\"}", "3"),
            ("palisade_xdp_packets_total{outcome=\"xdp-pass\"}", "40"),
            ("palisade_map_entries{map=\"policy\"}", "10"),
            ("palisade_map_capacity{map=\"policy\"}", "100"),
            ("palisade_map_capacity{map=\"ipcache\"}", "1024"),
            ("palisade_drops_total{reason=\"no-service-backend\"}", "2"),
            ("palisade_service_translations_total", "11"),
            ("palisade_conntrack_budget_untracked_total", "4"),
            ("palisade_conntrack_over_budget_endpoints", "1"),
        ] {
            assert_eq!(sample(&s, series).as_deref(), Some(v), "{series}\n{s}");
        }
        assert!(!s.contains("reason=\"service-translated\""), "{s}");
        // Bookkeeping, not a verdict.
        assert!(!s.contains("reason=\"conntrack-budget-untracked\""), "{s}");
        // Allowed reasons are verdicts, not drops.
        assert!(!s.contains("palisade_drops_total{reason=\"policy-allow\"}"));
        assert!(s.contains("# TYPE palisade_verdicts counter"), "{s}");
        assert!(s.contains("# TYPE palisade_map_capacity gauge"), "{s}");

        // Each scrape renders the values it is given, not a sum of scrapes.
        let mut later = kernel();
        later.reasons[0].2 = 6;
        later.maps.truncate(1);
        let s = m.render(&later);
        assert_eq!(
            sample(&s, "palisade_drops_total{reason=\"no-policy-match\"}").as_deref(),
            Some("6")
        );
        assert!(!s.contains("map=\"ipcache\""), "{s}");
    }

    #[test]
    fn every_sample_line_parses_as_name_labels_value() {
        let m = Metrics::default();
        m.map_full.inc_label("IPCACHE");
        m.sync_seconds.observe(0.01);
        let s = m.render(&kernel());
        for l in s.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = l.rsplit_once(' ').expect(l);
            assert!(value.parse::<f64>().is_ok(), "{l}");
            assert!(series.starts_with("palisade_"), "{l}");
            assert_eq!(series.contains('{'), series.ends_with('}'), "{l}");
        }
    }
}
