//! The docker role's live proof, in the booted image: a container image
//! is built locally (the image reaches no registry: a tar holding this
//! stemforge binary, with its loader and libraries when it is not
//! static, imported), a hardened container from it
//! runs and passes the container controls, and a deliberately
//! privileged one is flagged by them.

use super::{Proof, Rescan, run};
use crate::scan::outcome::Status;

const IMAGE: &str = "stemforge-probe:1";
const HARDENED: &str = "stemforge-probe-hardened";
const PRIVILEGED: &str = "stemforge-probe-privileged";

/// The container controls the hardened container must pass.
const CONTAINER_CONTROLS: &[&str] = &[
    "docker-containers-not-privileged",
    "docker-containers-host-network",
    "docker-containers-host-userns",
    "docker-containers-no-socket",
    "docker-containers-limits",
    "docker-seccomp-default",
    "docker-apparmor",
    "docker-containers-no-devices",
    "docker-containers-mounts",
    "docker-containers-ports",
    "docker-containers-cgroup",
    "docker-containers-user",
];

/// The shared objects a dynamic executable loads (its interpreter
/// too), as `ldd` lists them; none for a static one.
fn shared_objects(exe: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(out) = run("ldd", &[exe.to_str().unwrap_or_default()]) else {
        // ldd exits 1 on "not a dynamic executable".
        return Vec::new();
    };
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/')
                .then(|| std::path::PathBuf::from(path))
        })
        .collect()
}

/// A minimal image: this binary as /stemforge (with its loader and
/// libraries when it is not static), run as nobody.
fn image_tar() -> std::result::Result<std::path::PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating this binary: {e}"))?;
    let mut files = vec![(std::path::PathBuf::from("stemforge"), exe.clone())];
    for so in shared_objects(&exe) {
        files.push((so.strip_prefix("/").unwrap_or(&so).to_path_buf(), so));
    }
    let path = std::env::temp_dir().join("stemforge-probe.tar");
    let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut b = tar::Builder::new(file);
    for (name, source) in &files {
        let bytes = std::fs::read(source).map_err(|e| format!("{}: {e}", source.display()))?;
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, name, bytes.as_slice())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    b.finish()
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

pub fn prove(rescan: Rescan) -> Vec<Proof> {
    let mut p = Proof::new(
        "docker",
        "a hardened container runs; a privileged one is flagged",
    );
    let result = (|| -> std::result::Result<(), String> {
        let tar = image_tar()?;
        let id = run(
            "docker",
            &[
                "import",
                "--change",
                "USER 65534:65534",
                "--change",
                r#"ENTRYPOINT ["/stemforge"]"#,
                tar.to_str().unwrap_or_default(),
                IMAGE,
            ],
        )?;
        let _ = std::fs::remove_file(&tar);
        p.step(true, format!("built {IMAGE} locally ({id})"));
        let version = run(
            "docker",
            &[
                "run",
                "--rm",
                "--network",
                "none",
                "--read-only",
                IMAGE,
                "--version",
            ],
        )?;
        p.step(
            version.contains("stemforge"),
            format!("a container ran: {version}"),
        );
        run(
            "docker",
            &[
                "run",
                "--detach",
                "--name",
                HARDENED,
                "--read-only",
                "--memory",
                "64m",
                "--cpus",
                "0.5",
                "--pids-limit",
                "32",
                "--network",
                "none",
                "--cap-drop",
                "ALL",
                IMAGE,
                "idle",
                "600",
            ],
        )?;
        let r = rescan(CONTAINER_CONTROLS);
        for c in &r.results {
            p.step(
                c.status == Status::Pass && c.evidence.iter().any(|e| e.contains(HARDENED)),
                format!(
                    "{HARDENED}: {} {}: {}",
                    c.id,
                    c.status.as_str(),
                    c.evidence.join("; ")
                ),
            );
        }
        p.step(
            r.results.len() == CONTAINER_CONTROLS.len(),
            "every container control was evaluated",
        );
        run(
            "docker",
            &[
                "run",
                "--detach",
                "--name",
                PRIVILEGED,
                "--privileged",
                "--userns",
                "host",
                "--network",
                "none",
                IMAGE,
                "idle",
                "600",
            ],
        )?;
        let r = rescan(&["docker-containers-not-privileged"]);
        let flagged = r.results.first().is_some_and(|c| {
            c.status == Status::Fail
                && c.evidence
                    .iter()
                    .any(|e| e.contains(PRIVILEGED) && e.contains("privileged: yes"))
        });
        p.step(
            flagged,
            format!(
                "{PRIVILEGED} is flagged: {}",
                r.results
                    .first()
                    .map(|c| format!("{} {}", c.status.as_str(), c.evidence.join("; ")))
                    .unwrap_or_default()
            ),
        );
        Ok(())
    })();
    if let Err(e) = result {
        p.step(false, e);
    }
    let _ = run("docker", &["rm", "--force", HARDENED, PRIVILEGED]);
    vec![p]
}
