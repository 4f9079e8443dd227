//! Prometheus metrics in the text exposition format, and the HTTP endpoint
//! that serves them with /healthz and /readyz. The format is small enough
//! that a client library would add more code than it saves.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default, Debug)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A counter with one label.
#[derive(Default, Debug)]
pub struct LabeledCounter(Mutex<BTreeMap<String, u64>>);

impl LabeledCounter {
    pub fn inc_label(&self, label: &str) {
        *self
            .0
            .lock()
            .expect("metrics lock")
            .entry(label.to_string())
            .or_default() += 1;
    }
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().expect("metrics lock").clone()
    }
}

/// Latency histogram with fixed buckets (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Self {
            bounds: LATENCY_BUCKETS,
            inner: Mutex::new((vec![0; LATENCY_BUCKETS.len()], 0.0, 0)),
        }
    }
}

impl Histogram {
    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().expect("metrics lock");
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                g.0[i] += 1;
            }
        }
        g.1 += v;
        g.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let g = self.inner.lock().expect("metrics lock");
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in self.bounds.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", g.0[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", g.2);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", g.1, g.2);
    }
}

#[derive(Default, Debug)]
pub struct Metrics {
    pub compile_seconds: Histogram,
    pub sync_seconds: Histogram,
    pub policy_rejections: Counter,
    pub policies_rejected: Gauge,
    pub sync_errors: Counter,
    pub map_full: LabeledCounter,
    pub source_errors: Counter,
    pub programmed_generation: Gauge,
    pub flow_records: Counter,
}

/// Values read from the kernel at scrape time.
#[derive(Default, Debug)]
pub struct KernelStats {
    /// (reason name, is drop, packets)
    pub reasons: Vec<(&'static str, bool, u64)>,
    pub xdp: Vec<(&'static str, u64)>,
    /// (map, entries, capacity)
    pub maps: Vec<(String, u64, u64)>,
    pub endpoints: u64,
}

impl Metrics {
    pub fn render(&self, k: &KernelStats) -> String {
        let mut o = String::new();
        let mut simple = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        simple(
            "palisade_policy_rejections_total",
            "counter",
            "Policies rejected by the compiler (each rejection once).",
            self.policy_rejections.get(),
        );
        simple(
            "palisade_policies_rejected",
            "gauge",
            "Policies currently rejected.",
            self.policies_rejected.get(),
        );
        simple(
            "palisade_map_sync_errors_total",
            "counter",
            "Map syncs that stopped on an error.",
            self.sync_errors.get(),
        );
        simple(
            "palisade_source_errors_total",
            "counter",
            "Objects or manifests the source could not read.",
            self.source_errors.get(),
        );
        simple(
            "palisade_programmed_generation",
            "gauge",
            "Changes that have reached the kernel maps.",
            self.programmed_generation.get(),
        );
        simple(
            "palisade_flow_records_total",
            "counter",
            "Flow log records written.",
            self.flow_records.get(),
        );
        simple(
            "palisade_endpoints",
            "gauge",
            "Local endpoints registered.",
            k.endpoints,
        );

        let _ = writeln!(o, "# HELP palisade_map_full_errors_total Writes refused because a map was full.\n# TYPE palisade_map_full_errors_total counter");
        for (m, n) in self.map_full.snapshot() {
            let _ = writeln!(o, "palisade_map_full_errors_total{{map=\"{m}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP palisade_verdicts_total Packets by verdict reason, from the kernel's per-CPU counters.\n# TYPE palisade_verdicts_total counter");
        for (r, drop, n) in &k.reasons {
            let v = if *drop { "drop" } else { "allow" };
            let _ = writeln!(
                o,
                "palisade_verdicts_total{{verdict=\"{v}\",reason=\"{r}\"}} {n}"
            );
        }
        let _ = writeln!(o, "# HELP palisade_drops_total Dropped packets by reason.\n# TYPE palisade_drops_total counter");
        for (r, _, n) in k.reasons.iter().filter(|(_, d, _)| *d) {
            let _ = writeln!(o, "palisade_drops_total{{reason=\"{r}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP palisade_xdp_packets_total XDP prefilter packets by outcome.\n# TYPE palisade_xdp_packets_total counter");
        for (r, n) in &k.xdp {
            let _ = writeln!(o, "palisade_xdp_packets_total{{outcome=\"{r}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP palisade_map_entries Entries in each datapath map.\n# TYPE palisade_map_entries gauge");
        for (m, n, _) in &k.maps {
            let _ = writeln!(o, "palisade_map_entries{{map=\"{m}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP palisade_map_capacity Maximum entries of each datapath map.\n# TYPE palisade_map_capacity gauge");
        for (m, _, c) in &k.maps {
            let _ = writeln!(o, "palisade_map_capacity{{map=\"{m}\"}} {c}");
        }
        self.compile_seconds.render(
            &mut o,
            "palisade_policy_compile_seconds",
            "Time to compile the model into map contents.",
        );
        self.sync_seconds.render(
            &mut o,
            "palisade_map_sync_seconds",
            "Time to write a compiled change into the kernel maps.",
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(0.002);
        h.observe(0.2);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.001\"} 0"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.0025\"} 1"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.25\"} 2"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 2"), "{s}");
        assert!(s.contains("x_count 2"), "{s}");
    }

    #[test]
    fn render_exposes_kernel_reasons_and_map_fill() {
        let m = Metrics::default();
        m.map_full.inc_label("POLICY");
        let k = KernelStats {
            reasons: vec![("no-policy-match", true, 5), ("policy-allow", false, 9)],
            maps: vec![("policy".into(), 10, 100)],
            ..Default::default()
        };
        let s = m.render(&k);
        assert!(s.contains("palisade_drops_total{reason=\"no-policy-match\"} 5"));
        assert!(s.contains("palisade_verdicts_total{verdict=\"allow\",reason=\"policy-allow\"} 9"));
        assert!(s.contains("palisade_map_full_errors_total{map=\"POLICY\"} 1"));
        assert!(s.contains("palisade_map_capacity{map=\"policy\"} 100"));
    }
}
