//! A real CNI runtime: Debian's podman (CNI backend, through libcni, which
//! validates every result) runs busybox containers on a palisade network,
//! and on one where palisade is chained after the reference bridge and
//! host-local plugins. podman, the agent and the plugin all run in the
//! test's node namespace; podman's storage and config live in the test's
//! scratch directory.
//!
//! podman runs under `nsenter --net` rather than `ip netns exec`: the latter
//! mounts a fresh /sys, where runc finds no cgroup mount.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context, Result};
use palisade_tests::{
    cni::{allocations, bin, links, CniNode},
    require_root, run,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/cni");

/// podman with everything under `dir`, run in the node's namespace.
struct Podman {
    dir: PathBuf,
    netns: PathBuf,
}

impl Podman {
    fn new(n: &CniNode) -> Result<Self> {
        let dir = n.dir.path().join("podman");
        for d in ["plugins", "net", "root", "runroot", "tmp", "rootfs/bin"] {
            fs::create_dir_all(dir.join(d))?;
        }
        std::os::unix::fs::symlink(bin("palisade")?, dir.join("plugins/palisade"))?;
        let conf = fs::read_to_string(Path::new(FIXTURES).join("containers.conf"))?
            .replace("@DIR@", &dir.display().to_string());
        fs::write(dir.join("containers.conf"), conf)?;
        let p = Self {
            dir,
            netns: n.node.path(),
        };
        p.import_busybox()?;
        Ok(p)
    }

    /// localhost/bbox: Debian's busybox-static and its applet links.
    fn import_busybox(&self) -> Result<()> {
        let rootfs = self.dir.join("rootfs");
        fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .context("busybox-static is not installed")?;
        let list = run(Command::new("/bin/busybox").arg("--list"))?;
        for applet in String::from_utf8(list.stdout)?
            .lines()
            .filter(|a| *a != "busybox")
        {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
        }
        for d in ["etc", "tmp", "proc", "sys", "dev"] {
            fs::create_dir_all(rootfs.join(d))?;
        }
        let tar = self.dir.join("rootfs.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."))?;
        self.run(&["import", &tar.display().to_string(), "localhost/bbox"])?;
        Ok(())
    }

    /// Adds a conflist from the fixtures with its placeholders filled.
    fn network(&self, fixture: &str, vars: &[(&str, String)]) -> Result<()> {
        let mut text = fs::read_to_string(Path::new(FIXTURES).join(fixture))?;
        for (k, v) in vars {
            text = text.replace(k, v);
        }
        let name = vars
            .iter()
            .find(|(k, _)| *k == "@NAME@")
            .context("@NAME@")?
            .1
            .clone();
        fs::write(self.dir.join("net").join(format!("{name}.conflist")), text)?;
        Ok(())
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns.display()))
            .arg("podman")
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        c
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        Ok(String::from_utf8(run(&mut self.cmd(args))?.stdout)?
            .trim()
            .to_string())
    }

    fn ip(&self, container: &str, network: &str) -> Result<String> {
        self.run(&[
            "inspect",
            "--format",
            &format!("{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}"),
            container,
        ])
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Removing the containers runs CNI DEL for them.
        let _ = self
            .cmd(&["rm", "--all", "--force", "--time", "0"])
            .output();
        let _ = self.cmd(&["rmi", "--all", "--force"]).output();
    }
}

/// Two containers on `network`: they reach each other by address, the
/// agent has both, and `podman rm` frees everything.
fn two_containers_talk(n: &CniNode, p: &Podman, network: &str, expect_host_if: &str) -> Result<()> {
    let net = format!("--network={network}");
    let (a, b) = (format!("{network}-a"), format!("{network}-b"));
    p.run(&[
        "run",
        "-d",
        "--name",
        &a,
        &net,
        "localhost/bbox",
        "sleep",
        "1000",
    ])?;
    p.run(&[
        "run",
        "-d",
        "--name",
        &b,
        &net,
        "localhost/bbox",
        "nc",
        "-ll",
        "-p",
        "8080",
        "-e",
        "/bin/cat",
    ])?;
    let (ip_a, ip_b) = (p.ip(&a, network)?, p.ip(&b, network)?);
    ensure!(
        !ip_a.is_empty() && ip_a != ip_b,
        "addresses {ip_a:?} {ip_b:?}"
    );

    let echoed = p.run(&[
        "exec",
        &a,
        "sh",
        "-c",
        &format!("echo across-the-node | nc -w 3 {ip_b} 8080"),
    ])?;
    assert_eq!(echoed, "across-the-node");
    p.run(&["exec", &b, "ping", "-c", "1", "-W", "3", &ip_a])?;

    let eps = n.endpoints()?;
    for (name, ip) in [(&a, &ip_a), (&b, &ip_b)] {
        // podman passes K8S_POD_NAME=<container name> only.
        let e = eps
            .iter()
            .find(|e| e.0 == format!("default/{name}"))
            .with_context(|| format!("{name} in {eps:?}"))?;
        assert_eq!(e.1.to_string(), *ip);
        assert!(e.2.starts_with(expect_host_if), "{e:?}");
    }

    p.run(&["rm", "--force", "--time", "0", &a, &b])?;
    assert!(n.endpoints()?.is_empty(), "{:?}", n.endpoints()?);
    Ok(())
}

#[test]
fn podman_on_a_palisade_network() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    let p = Podman::new(&n)?;
    let ipam = n.ipam_dir();
    p.network(
        "palisade.conflist",
        &[
            ("@NAME@", "palnet".to_string()),
            ("@SOCKET@", n.socket().display().to_string()),
            ("@SUBNET@", "10.211.0.0/24".to_string()),
            ("@IPAM_DIR@", ipam.display().to_string()),
        ],
    )?;
    let listed = p.run(&["network", "ls", "--format", "{{.Name}}"])?;
    ensure!(
        listed.lines().any(|l| l == "palnet"),
        "podman does not list palnet: {listed}"
    );

    // The MTU from the config reaches the container.
    p.run(&[
        "run",
        "-d",
        "--name",
        "mtu",
        "--network=palnet",
        "localhost/bbox",
        "sleep",
        "1000",
    ])?;
    assert_eq!(
        p.run(&["exec", "mtu", "cat", "/sys/class/net/eth0/mtu"])?,
        "1450"
    );
    assert_eq!(allocations(&ipam).len(), 1);
    p.run(&["rm", "--force", "--time", "0", "mtu"])?;
    assert!(allocations(&ipam).is_empty());

    two_containers_talk(&n, &p, "palnet", "pal")?;
    assert!(
        allocations(&ipam).is_empty(),
        "podman rm frees the addresses: {:?}",
        allocations(&ipam)
    );
    assert_eq!(links(&n.node)?, ["lo"]);
    Ok(())
}

#[test]
fn podman_chained_after_bridge_and_host_local() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    let p = Podman::new(&n)?;
    let ipam = n.dir.path().join("host-local");
    p.network(
        "chained.conflist",
        &[
            ("@NAME@", "chainnet".to_string()),
            ("@BRIDGE@", format!("pcbr{}", std::process::id() % 100_000)),
            ("@SOCKET@", n.socket().display().to_string()),
            ("@SUBNET@", "10.212.0.0/24".to_string()),
            ("@IPAM_DIR@", ipam.display().to_string()),
        ],
    )?;
    two_containers_talk(&n, &p, "chainnet", "veth")?;
    assert!(
        allocations(&ipam.join("chainnet")).is_empty(),
        "host-local released the addresses"
    );
    let left: Vec<String> = links(&n.node)?
        .into_iter()
        .filter(|l| l.starts_with("veth"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    Ok(())
}
