//! Egress by domain name, as the tests and the bench exercise it: a DNS
//! server pod speaking the real wire format (`simple-dns`) over UDP and
//! TCP, a resolver, and external hosts in a namespace behind the node.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use simple_dns::{
    rdata, Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE,
};

use crate::{tcp_echo_server, unique, NetNs};

/// The namespaces of the tests' and the bench's clusters: `shop` (subject
/// of the domain rules), `lab` (not), `kube-system` (the DNS pod).
pub const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: lab}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
"#;

/// A zone: (name, TTL, record).
pub type Zone = &'static [(&'static str, u32, Rec)];

#[derive(Clone, Copy)]
pub enum Rec {
    A(Ipv4Addr),
    Cname(&'static str),
}

fn reply(zone: Zone, query: &[u8]) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    let question = q.questions.first()?.clone();
    let mut r = Packet::new_reply(q.id());
    r.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    let mut name = question.qname.to_string().to_ascii_lowercase();
    r.questions.push(question.into_owned());
    let mut found = false;
    for _ in 0..4 {
        let Some((_, ttl, rec)) = zone.iter().find(|(n, _, _)| *n == name) else {
            break;
        };
        found = true;
        let owner = Name::new_unchecked(&name).into_owned();
        match rec {
            Rec::A(a) => {
                r.answers.push(ResourceRecord::new(
                    owner,
                    CLASS::IN,
                    *ttl,
                    rdata::RData::A(rdata::A {
                        address: u32::from(*a),
                    }),
                ));
                break;
            }
            Rec::Cname(t) => {
                r.answers.push(ResourceRecord::new(
                    owner,
                    CLASS::IN,
                    *ttl,
                    rdata::RData::CNAME(rdata::CNAME(Name::new_unchecked(t).into_owned())),
                ));
                name = t.to_string();
            }
        }
    }
    if !found {
        *r.rcode_mut() = simple_dns::RCODE::NameError;
    }
    r.build_bytes_vec_compressed().ok()
}

/// UDP and TCP 53 in `ns` answering from `zone`. Over TCP the length
/// prefix and the message go in two segments, 20 ms apart: the agent must
/// read across them.
pub fn dns_server(ns: &NetNs, zone: Zone) -> Result<()> {
    let (udp, tcp) = ns.enter(|| -> Result<(UdpSocket, TcpListener)> {
        Ok((
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 53))?,
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, 53))?,
        ))
    })??;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            if let Some(r) = reply(zone, &buf[..n]) {
                let _ = udp.send_to(&r, from);
            }
        }
    });
    std::thread::spawn(move || {
        for s in tcp.incoming().flatten() {
            std::thread::spawn(move || -> Result<()> {
                let mut s = s;
                s.set_nodelay(true)?;
                loop {
                    let mut len = [0u8; 2];
                    s.read_exact(&mut len)?;
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    s.read_exact(&mut q)?;
                    let Some(r) = reply(zone, &q) else {
                        bail!("no reply")
                    };
                    s.write_all(&(r.len() as u16).to_be_bytes())?;
                    std::thread::sleep(Duration::from_millis(20));
                    s.write_all(&r)?;
                }
            });
        }
    });
    Ok(())
}

pub fn query(name: &str) -> Vec<u8> {
    let mut q = Packet::new_query(0x4242);
    q.set_flags(PacketFlag::RECURSION_DESIRED);
    q.questions.push(Question::new(
        Name::new_unchecked(name).into_owned(),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    q.build_bytes_vec().expect("query")
}

pub fn addresses(answer: &[u8]) -> Vec<Ipv4Addr> {
    let Ok(p) = Packet::parse(answer) else {
        return Vec::new();
    };
    p.answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            rdata::RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect()
}

/// One lookup from inside a pod and the connection that follows it.
#[derive(Clone, Debug)]
pub struct Lookup {
    pub addresses: Vec<Ipv4Addr>,
    /// From sending the query to having the answer.
    pub took: Duration,
    /// The connection to the first address on `port`, made at once, was
    /// established before the first SYN retransmission (1 s).
    pub connected: bool,
}

/// Resolve `name` from inside `ns` through `dns` (UDP, or TCP), then
/// connect to the first address on `port` at once, as a client does.
pub fn lookup_and_connect(
    ns: &NetNs,
    dns: Ipv4Addr,
    name: &'static str,
    tcp: bool,
    port: u16,
) -> Result<Lookup> {
    ns.enter(move || -> Result<Lookup> {
        let q = query(name);
        let t = Instant::now();
        let answer = if tcp {
            let mut s = TcpStream::connect_timeout(&(dns, 53).into(), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(&(q.len() as u16).to_be_bytes())?;
            s.write_all(&q)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len)?;
            let mut a = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut a)?;
            a
        } else {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.send_to(&q, (dns, 53))?;
            let mut buf = [0u8; 1500];
            let n = s.recv(&mut buf).context("no DNS answer")?;
            buf[..n].to_vec()
        };
        let took = t.elapsed();
        let addresses = addresses(&answer);
        let connected = match addresses.first() {
            // Well under the first SYN retransmission (1 s): a dropped
            // first SYN fails the connection.
            Some(a) => {
                TcpStream::connect_timeout(&(*a, port).into(), Duration::from_millis(700)).is_ok()
            }
            None => false,
        };
        Ok(Lookup {
            addresses,
            took,
            connected,
        })
    })?
}

/// A namespace holding `hosts` behind the node (`gw` is the node's
/// address towards it; the first host's /24 is the link), each serving a
/// TCP echo on `port`.
pub fn external(node: &NetNs, gw: Ipv4Addr, hosts: &[Ipv4Addr], port: u16) -> Result<NetNs> {
    let ext = NetNs::new("pext")?;
    let host_if: String = format!("x{}", unique("")).chars().take(15).collect();
    node.ip(&[
        "link", "add", &host_if, "type", "veth", "peer", "name", "up0", "netns", &ext.name,
    ])?;
    node.ip(&["addr", "add", &format!("{gw}/24"), "dev", &host_if])?;
    node.ip(&["link", "set", &host_if, "up"])?;
    ext.ip(&["link", "set", "up0", "up"])?;
    ext.ip(&["link", "set", "lo", "up"])?;
    for (i, a) in hosts.iter().enumerate() {
        ext.ip(&[
            "addr",
            "add",
            &format!("{a}/{}", if i == 0 { 24 } else { 32 }),
            "dev",
            "up0",
        ])?;
    }
    ext.ip(&["route", "add", "default", "via", &gw.to_string()])?;
    tcp_echo_server(&ext, port)?;
    Ok(ext)
}
