//! The agent's flow log (JSON lines, agent/src/flowlog.rs `FlowRecord`),
//! read from the file as an operator would, to explain verdicts.
use std::{
    fs::File,
    io::{BufRead, BufReader, Seek, SeekFrom},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Side {
    /// IPv4 or IPv6 (a record of either family parses).
    #[serde(default = "unspecified")]
    pub ip: IpAddr,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub pod: Option<String>,
}

fn unspecified() -> IpAddr {
    Ipv4Addr::UNSPECIFIED.into()
}

impl Default for Side {
    fn default() -> Self {
        Self {
            ip: unspecified(),
            port: None,
            kind: String::new(),
            namespace: None,
            pod: None,
        }
    }
}

impl Side {
    /// `ns/pod`, or the address and its kind.
    pub fn who(&self) -> String {
        match (&self.namespace, &self.pod) {
            (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
            _ if self.kind.is_empty() => self.ip.to_string(),
            _ => format!("{} ({})", self.ip, self.kind),
        }
    }
}

/// The fields of a flow record this crate reads; others are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Flow {
    #[serde(default)]
    pub verdict: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub drop_reason: Option<String>,
    #[serde(default)]
    pub direction: String,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub src: Side,
    #[serde(default)]
    pub dst: Side,
    #[serde(default)]
    pub endpoint: String,
    #[serde(default)]
    pub policies: Vec<String>,
    /// A translated flow's Service (`ns/name`) and its ClusterIP:port.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub service_address: Option<String>,
    /// The node whose agent recorded it (several nodes).
    #[serde(default)]
    pub node: Option<String>,
    /// Egress by domain name: the names learned for the destination
    /// address that the deciding rule allows.
    #[serde(default)]
    pub domains: Vec<String>,
}

impl Flow {
    /// The record of a connection from `src` to `dst:port/protocol`.
    pub fn is(
        &self,
        src: impl Into<IpAddr>,
        dst: impl Into<IpAddr>,
        port: u16,
        protocol: &str,
    ) -> bool {
        self.src.ip == src.into()
            && self.dst.ip == dst.into()
            && self.dst.port == Some(port)
            && self.protocol == protocol
    }

    /// One line, e.g. `DROP app/probe -> app/backend:8080 TCP
    /// (no-policy-match at ingress of app/backend; isolated by app/default-deny-all)`.
    pub fn describe(&self) -> String {
        let port = self.dst.port.map(|p| format!(":{p}")).unwrap_or_default();
        let head = format!(
            "{} {} -> {}{port} {}",
            self.verdict,
            self.src.who(),
            self.dst.who(),
            self.protocol
        );
        let at = format!("{} of {}", self.direction, self.endpoint);
        let policies = self.policies.join(", ");
        let why = match (self.verdict.as_str(), self.drop_reason.as_deref()) {
            ("ALLOW", _) if policies.is_empty() => format!("{at}: {}", self.reason),
            ("ALLOW", _) => format!("{at}: allowed by {policies}"),
            (_, Some("no-policy-match")) | (_, None) if !policies.is_empty() => {
                format!(
                    "{} at {at}; isolated by {policies}",
                    self.drop_reason.as_deref().unwrap_or(&self.reason)
                )
            }
            // A ClusterNetworkPolicy Deny names its rule.
            (_, Some(r @ "deny-rule")) if !policies.is_empty() => {
                format!("{r} at {at} by {policies}")
            }
            (_, Some(r)) => format!("{r} at {at}"),
            (_, None) => format!("{} at {at}", self.reason),
        };
        match (&self.service, &self.service_address) {
            (Some(s), Some(a)) => format!("{head} ({why}) via Service {s} ({a})"),
            (Some(s), None) => format!("{head} ({why}) via Service {s}"),
            _ => format!("{head} ({why})"),
        }
    }
}

/// New lines of a flow log file, from where the tail was created.
pub struct Tail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl Tail {
    /// Starts at the current end of the file (or its beginning, when the
    /// agent has not created it yet).
    pub fn new(path: &Path) -> Self {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Self {
            path: path.to_path_buf(),
            offset,
            partial: String::new(),
        }
    }

    /// Records written since the last call. Lines that are not records
    /// (or are half written) are skipped or kept for the next call.
    pub fn read(&mut self) -> Vec<Flow> {
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Rotated: start over on the new file.
            self.offset = 0;
            self.partial.clear();
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut r = BufReader::new(f);
        let mut line = String::new();
        while let Ok(n) = r.read_line(&mut line) {
            if n == 0 {
                break;
            }
            self.offset += n as u64;
            if !line.ends_with('\n') {
                self.partial.push_str(&line);
                line.clear();
                break;
            }
            let whole = std::mem::take(&mut self.partial) + line.trim_end();
            if let Ok(flow) = serde_json::from_str::<Flow>(&whole) {
                out.push(flow);
            }
            line.clear();
        }
        out
    }

    /// Reads until `done` says the records gathered so far are enough, or
    /// the timeout passes (the agent writes records shortly after the
    /// packets, from a ring buffer).
    pub fn gather(&mut self, timeout: Duration, done: impl Fn(&[Flow]) -> bool) -> Vec<Flow> {
        let deadline = Instant::now() + timeout;
        let mut all = self.read();
        while !done(&all) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            all.extend(self.read());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROP: &str = r#"{"time":"t","verdict":"DROP","reason":"no-policy-match","drop_reason":"no-policy-match","direction":"ingress","protocol":"TCP","src":{"ip":"10.213.0.5","port":40000,"kind":"pod","namespace":"app","pod":"probe","labels":{"role":"probe"},"identity":7},"dst":{"ip":"10.213.0.3","port":8080,"kind":"pod","namespace":"app","pod":"backend","identity":8},"endpoint":"app/backend","policies":["app/default-deny-all"]}"#;
    const ALLOW: &str = r#"{"time":"t","verdict":"ALLOW","reason":"policy","direction":"egress","protocol":"UDP","src":{"ip":"10.213.0.2","port":5000,"kind":"pod","namespace":"app","pod":"frontend","identity":9},"dst":{"ip":"10.213.0.9","port":53,"kind":"world","identity":2},"endpoint":"app/frontend","policies":["app/allow-dns"]}"#;

    #[test]
    fn describes_records() {
        let d: Flow = serde_json::from_str(DROP).unwrap();
        assert!(d.is(
            "10.213.0.5".parse::<IpAddr>().unwrap(),
            "10.213.0.3".parse::<Ipv4Addr>().unwrap(),
            8080,
            "TCP"
        ));
        assert_eq!(
            d.describe(),
            "DROP app/probe -> app/backend:8080 TCP (no-policy-match at ingress of app/backend; isolated by app/default-deny-all)"
        );
        let a: Flow = serde_json::from_str(ALLOW).unwrap();
        assert_eq!(
            a.describe(),
            "ALLOW app/frontend -> 10.213.0.9 (world):53 UDP (egress of app/frontend: allowed by app/allow-dns)"
        );
        // An IPv6 record parses and matches its own addresses only.
        let v6: Flow = serde_json::from_str(
            &DROP
                .replace("10.213.0.5", "fd00:212:213:0:ad50:50::")
                .replace("10.213.0.3", "fd00:212:213:0:ad50:30::"),
        )
        .unwrap();
        let (s6, d6): (IpAddr, IpAddr) = (
            "fd00:212:213:0:ad50:50::".parse().unwrap(),
            "fd00:212:213:0:ad50:30::".parse().unwrap(),
        );
        assert!(v6.is(s6, d6, 8080, "TCP"));
        assert!(!d.is(s6, d6, 8080, "TCP"));
        assert!(v6
            .describe()
            .starts_with("DROP app/probe -> app/backend:8080 TCP"));
        let spoof = Flow {
            verdict: "DROP".into(),
            drop_reason: Some("spoofed-source".into()),
            ..d.clone()
        };
        assert!(
            spoof
                .describe()
                .ends_with("(spoofed-source at ingress of app/backend)"),
            "{}",
            spoof.describe()
        );
    }

    #[test]
    fn tail_reads_only_new_complete_lines() {
        let dir = std::env::temp_dir().join(format!("palisade-flowtail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        std::fs::write(&path, format!("{DROP}\n")).unwrap();
        let mut t = Tail::new(&path);
        assert!(t.read().is_empty());
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        write!(f, "{ALLOW}\nnot json\n{}", &DROP[..20]).unwrap();
        let got = t.read();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].verdict, "ALLOW");
        writeln!(f, "{}", &DROP[20..]).unwrap();
        let got = t.gather(Duration::from_millis(10), |f| !f.is_empty());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].endpoint, "app/backend");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
