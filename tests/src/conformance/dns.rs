//! A minimal DNS responder for the demo's kube-dns pod: A records for the
//! names the demo registers (`set_records`), answered on the pod's UDP
//! probe server (`probe::Servers`), so a pod resolves names through the
//! kube-dns ClusterIP with its own resolver (glibc), as in a cluster.
//! Anything that is not a standard query (the conformance probes' datagrams)
//! is left to the echo; with no records registered it answers nothing.
//!
//! Hand-written (one question, one A answer, RFC 1035 §4.1) rather than a
//! DNS crate: it is the only DNS the project serves, in a test binary.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Mutex, OnceLock},
};

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const TTL_S: u32 = 30;
const RCODE_NXDOMAIN: u8 = 3;

fn records() -> &'static Mutex<BTreeMap<String, Ipv4Addr>> {
    static R: OnceLock<Mutex<BTreeMap<String, Ipv4Addr>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The names (without the trailing dot, any case) this process answers.
pub fn set_records(r: impl IntoIterator<Item = (String, Ipv4Addr)>) {
    let mut m = records().lock().expect("dns records");
    m.clear();
    m.extend(r.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)));
}

/// The answer to `query`, if it is a standard query with one question and
/// this process has records: A for a known name, no data for another type
/// of a known name, NXDOMAIN for an unknown one.
pub fn answer(query: &[u8]) -> Option<Vec<u8>> {
    let recs = records().lock().ok()?;
    if recs.is_empty() || query.len() < 12 {
        return None;
    }
    let flags = u16::from_be_bytes([query[2], query[3]]);
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    // QR = 0 (a query), opcode 0 (standard), one question.
    if flags & 0xf800 != 0 || qdcount != 1 {
        return None;
    }
    let (name, end) = qname(query, 12)?;
    if end + 4 > query.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([query[end], query[end + 1]]);
    let qclass = u16::from_be_bytes([query[end + 2], query[end + 3]]);
    let addr = recs.get(&name).copied();
    let mut a = Vec::with_capacity(end + 4 + 16);
    a.extend_from_slice(&query[..2]);
    // QR, AA, RD as asked, RA; the rcode.
    let rd = query[2] & 0x01;
    a.push(0x84 | rd);
    a.push(0x80 | if addr.is_none() { RCODE_NXDOMAIN } else { 0 });
    let an: u16 = (addr.is_some() && qtype == TYPE_A && qclass == CLASS_IN).into();
    for n in [1u16, an, 0, 0] {
        a.extend_from_slice(&n.to_be_bytes());
    }
    a.extend_from_slice(&query[12..end + 4]);
    if an == 1 {
        a.extend_from_slice(&[0xc0, 12]); // the question's name
        a.extend_from_slice(&TYPE_A.to_be_bytes());
        a.extend_from_slice(&CLASS_IN.to_be_bytes());
        a.extend_from_slice(&TTL_S.to_be_bytes());
        a.extend_from_slice(&4u16.to_be_bytes());
        a.extend_from_slice(&addr.expect("known").octets());
    }
    Some(a)
}

/// The dotted, lower-case name at `off` (no compression in questions) and
/// the offset after it.
fn qname(m: &[u8], mut off: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    loop {
        let len = *m.get(off)? as usize;
        off += 1;
        if len == 0 {
            break;
        }
        if len > 63 || labels.len() > 127 {
            return None;
        }
        let l = m.get(off..off + len)?;
        labels.push(std::str::from_utf8(l).ok()?.to_ascii_lowercase());
        off += len;
    }
    Some((labels.join("."), off))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn answers_known_names_and_leaves_other_datagrams_alone() {
        set_records([(
            "Backend.app.svc.cluster.local".to_string(),
            Ipv4Addr::new(10, 1, 2, 3),
        )]);
        let q = query(0xbeef, "backend.APP.svc.cluster.local", TYPE_A);
        let a = answer(&q).expect("answered");
        assert_eq!(&a[..2], &[0xbe, 0xef]);
        assert_eq!(a[2] & 0x80, 0x80, "a response");
        assert_eq!(a[3] & 0x0f, 0, "NOERROR");
        assert_eq!(&a[4..12], &[0, 1, 0, 1, 0, 0, 0, 0]);
        assert_eq!(&a[12..q.len()], &q[12..], "the question");
        assert_eq!(&a[a.len() - 4..], &[10, 1, 2, 3]);

        let aaaa = answer(&query(1, "backend.app.svc.cluster.local", 28)).unwrap();
        assert_eq!((aaaa[3] & 0x0f, &aaaa[6..8]), (0, &[0u8, 0][..]), "no data");
        let nx = answer(&query(2, "nope.app.svc.cluster.local", TYPE_A)).unwrap();
        assert_eq!((nx[3] & 0x0f, &nx[6..8]), (3, &[0u8, 0][..]), "NXDOMAIN");

        assert_eq!(answer(b"palisade-probe 123 4"), None, "a probe: echoed");
        let mut reply = q.clone();
        reply[2] |= 0x80;
        assert_eq!(answer(&reply), None, "never answers a response");
        assert_eq!(answer(&q[..20]), None, "truncated");
        set_records([]);
        assert_eq!(answer(&q), None, "no records: plain echo");
    }
}
