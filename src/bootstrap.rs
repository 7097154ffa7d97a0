//! Bootstrap: a minimal root tree from the distribution's archive with
//! mmdebstrap (minbase + the profile's packages, in one apt run; each
//! stage's layer installs the stage's own), cached by content: the key covers the inputs and the
//! archive's signed Release files, so a cached tree is reused exactly
//! until the archive changes.

use crate::cache::{Cache, Hit};
use crate::chroot::wrap_in_namespace;
use crate::exec::{self, Cmd};
use crate::fsutil;
use crate::profile::Profile;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bump when the way a tree is bootstrapped changes, to retire old cache
/// entries.
const FORMAT: u32 = 1;

/// How long a mirror may take to answer the preflight.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(8);

/// One apt source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    pub mirror: String,
    pub suite: String,
    pub components: Vec<String>,
}

impl Source {
    /// The sources.list line, keyring pinned.
    pub fn deb_line(&self, keyring: &str) -> String {
        format!(
            "deb [signed-by={keyring}] {} {} {}",
            self.mirror.trim_end_matches('/'),
            self.suite,
            self.components.join(" ")
        )
    }

    /// Where the signed Release file lives.
    pub fn inrelease_url(&self) -> String {
        format!(
            "{}/dists/{}/InRelease",
            self.mirror.trim_end_matches('/'),
            self.suite
        )
    }
}

/// Mirrors given on the command line: `--mirror` for the profile's
/// archive, `--suite-mirror SUITE=URL` for one suite (which wins over the
/// profile's own per-suite mirror).
#[derive(Debug, Clone, Default)]
pub struct MirrorOverrides {
    pub default: Option<String>,
    pub suites: std::collections::BTreeMap<String, String>,
}

/// Everything that decides the bootstrapped tree.
#[derive(Debug, Clone, Serialize)]
pub struct BootstrapSpec {
    pub format: u32,
    pub distro: String,
    pub codename: String,
    pub arch: String,
    pub variant: String,
    pub keyring: String,
    pub sources: Vec<Source>,
    pub packages: Vec<String>,
    pub dpkg_path_exclude: Vec<String>,
    pub dpkg_path_include: Vec<String>,
    /// Files placed before any package installs: (path, content).
    pub seed: Vec<(String, String)>,
}

/// initramfs-tools cannot probe the root device while building: say what
/// it will be.
pub const INITRAMFS_CONF: &str =
    "# stemforge: the root file system is ext4 (it cannot be probed while building)\nFSTYPE=ext4\n";

impl BootstrapSpec {
    pub fn new(
        p: &Profile,
        mirrors: &MirrorOverrides,
        packages: Vec<String>,
        seed: Vec<(String, String)>,
    ) -> BootstrapSpec {
        let sources = p
            .bootstrap
            .suites
            .iter()
            .map(|s| Source {
                mirror: mirrors
                    .suites
                    .get(s)
                    .or(p.bootstrap.suite_mirrors.get(s))
                    .or(mirrors.default.as_ref())
                    .unwrap_or(&p.bootstrap.mirror)
                    .clone(),
                suite: s.clone(),
                components: p.bootstrap.components.clone(),
            })
            .collect();
        BootstrapSpec {
            format: FORMAT,
            distro: p.os.distro.clone(),
            codename: p.os.codename.clone(),
            arch: "amd64".into(),
            variant: p.bootstrap.variant.clone(),
            keyring: p.bootstrap.keyring.clone(),
            sources,
            packages,
            dpkg_path_exclude: p.bootstrap.dpkg_path_exclude.clone(),
            dpkg_path_include: p.bootstrap.dpkg_path_include.clone(),
            seed,
        }
    }

    /// The cache key: the spec plus the Release files it resolves against.
    pub fn cache_key(&self, releases: &[Vec<u8>]) -> String {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(self).expect("spec serializes"));
        for r in releases {
            h.update(Sha256::digest(r));
        }
        let d = h.finalize();
        d.iter().take(16).map(|b| format!("{b:02x}")).collect()
    }

    /// Write the seed files under `dir` (a tree mmdebstrap syncs in).
    pub fn write_seed(&self, dir: &Path) -> Result<()> {
        for (path, content) in &self.seed {
            let dest = dir.join(path.trim_start_matches('/'));
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::write(&dest, content)
                .with_context(|| format!("writing {}", dest.display()))?;
        }
        Ok(())
    }

    /// The mmdebstrap command that makes the tree at `target` (with the
    /// seed files from `seed_dir`), in a mount namespace of its own.
    pub fn command(&self, target: &Path, seed_dir: &Path) -> Cmd {
        let mut c = exec::cmd(
            "mmdebstrap",
            [
                "--mode=root".to_string(),
                "--format=directory".to_string(),
                format!("--variant={}", self.variant),
                format!("--architectures={}", self.arch),
                format!("--keyring={}", self.keyring),
                format!("--include={}", self.packages.join(",")),
                "--aptopt=Acquire::Retries \"3\"".to_string(),
                "--aptopt=APT::Install-Recommends \"false\"".to_string(),
                "--skip=cleanup/apt/lists".to_string(),
            ],
        );
        for p in &self.dpkg_path_exclude {
            c = c.arg(format!("--dpkgopt=path-exclude={p}"));
        }
        for p in &self.dpkg_path_include {
            c = c.arg(format!("--dpkgopt=path-include={p}"));
        }
        c = c.arg(format!("--essential-hook=sync-in {} /", seed_dir.display()));
        c = c.arg(&self.codename).arg(target);
        for s in &self.sources {
            c = c.arg(s.deb_line(&self.keyring));
        }
        wrap_in_namespace(c)
    }
}

/// Fetch a suite's InRelease file (the preflight's "mirror answers" test).
pub fn fetch_release(source: &Source) -> Result<Vec<u8>> {
    let url = source.inrelease_url();
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(MIRROR_TIMEOUT)
        .timeout(MIRROR_TIMEOUT * 2)
        .build();
    let resp = agent.get(&url).call().map_err(|e| match e {
        ureq::Error::Status(code, _) => anyhow::anyhow!(
            "mirror {} has no suite {} (HTTP {code} for {url})",
            source.mirror,
            source.suite
        ),
        ureq::Error::Transport(t) => {
            let why = t.to_string();
            let why = why
                .strip_prefix(&format!("{url}: "))
                .unwrap_or(&why)
                .to_string();
            anyhow::anyhow!(
                "mirror {} does not answer: {why}; check the network, or pass --mirror URL",
                source.mirror
            )
        }
    })?;
    let mut body = Vec::new();
    use std::io::Read;
    resp.into_reader()
        .take(64 << 20)
        .read_to_end(&mut body)
        .with_context(|| format!("reading {url}"))?;
    if !body.starts_with(b"-----BEGIN PGP SIGNED MESSAGE-----") {
        bail!(
            "{url} is not a signed Release file; is {} an apt mirror?",
            source.mirror
        );
    }
    Ok(body)
}

/// A bootstrapped tree in the cache, made if needed.
/// The name of the cache entry that holds `spec`'s tree.
fn cache_key(spec: &BootstrapSpec, releases: &[Vec<u8>]) -> String {
    format!(
        "{}-{}-{}",
        spec.distro,
        spec.codename,
        spec.cache_key(releases)
    )
}

/// The bootstrapped tree of `spec` (from the cache, or made into it),
/// whether it was cached, and its cache key (build manifests record it).
pub fn bootstrap(
    cache: &Cache,
    spec: &BootstrapSpec,
    releases: &[Vec<u8>],
) -> Result<(PathBuf, Hit, String, crate::cache::Lock)> {
    let key = cache_key(spec, releases);
    let (entry, hit, lock) = cache.get_or_make("bootstrap", &key, |dir| {
        let tree = dir.join("rootfs");
        let seed = dir.join("seed");
        spec.write_seed(&seed)?;
        spec.command(&tree, &seed)
            .run()
            .with_context(|| format!("bootstrapping {} {}", spec.distro, spec.codename))?;
        fsutil::remove_tree(&seed)?;
        let meta = serde_json::to_vec_pretty(spec)?;
        std::fs::write(dir.join("spec.json"), meta).context("writing spec.json")?;
        Ok(())
    })?;
    Ok((entry.join("rootfs"), hit, key, lock))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{ProfileSource, load};

    #[test]
    fn debian_sources_use_the_security_mirror() {
        let p = load("debian-bookworm", &ProfileSource::Embedded).unwrap();
        let spec = BootstrapSpec::new(
            &p,
            &MirrorOverrides {
                default: Some("http://mirror.example/debian".into()),
                ..Default::default()
            },
            vec!["openssh-server".into()],
            vec![],
        );
        let lines: Vec<String> = spec
            .sources
            .iter()
            .map(|s| s.deb_line(&spec.keyring))
            .collect();
        assert_eq!(
            lines,
            vec![
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bookworm main",
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bookworm-updates main",
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main",
            ]
        );
        let both = BootstrapSpec::new(
            &p,
            &MirrorOverrides {
                default: Some("http://mirror.example/debian".into()),
                suites: [(
                    "bookworm-security".to_string(),
                    "http://mirror.example/security".to_string(),
                )]
                .into(),
            },
            vec![],
            vec![],
        );
        assert_eq!(both.sources[2].mirror, "http://mirror.example/security");
        assert_eq!(both.sources[1].mirror, "http://mirror.example/debian");
        assert_eq!(
            spec.sources[0].inrelease_url(),
            "http://mirror.example/debian/dists/bookworm/InRelease"
        );
    }

    #[test]
    fn command_is_namespaced_and_complete() {
        let p = load("ubuntu-noble", &ProfileSource::Embedded).unwrap();
        let seed = vec![(
            "/etc/initramfs-tools/conf.d/stemforge.conf".to_string(),
            INITRAMFS_CONF.to_string(),
        )];
        let spec = BootstrapSpec::new(
            &p,
            &MirrorOverrides::default(),
            vec!["linux-image-virtual".into(), "openssh-server".into()],
            seed,
        );
        let line = spec
            .command(Path::new("/x/rootfs"), Path::new("/x/seed"))
            .display();
        assert!(
            line.starts_with("unshare --mount --pid --fork --kill-child"),
            "{line}"
        );
        assert!(
            line.contains("--include=linux-image-virtual,openssh-server"),
            "{line}"
        );
        assert!(
            line.contains("--keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg"),
            "{line}"
        );
        assert!(line.contains("'deb [signed-by=/usr/share/keyrings/ubuntu-archive-keyring.gpg] http://archive.ubuntu.com/ubuntu noble main universe'"), "{line}");
        assert!(
            line.contains("http://security.ubuntu.com/ubuntu noble-security main universe"),
            "{line}"
        );
        assert!(
            line.contains("--dpkgopt=path-exclude=/usr/share/man/*"),
            "{line}"
        );
        assert!(
            line.contains("--essential-hook=sync-in /x/seed /"),
            "{line}"
        );
        let d = tempfile::tempdir().unwrap();
        spec.write_seed(d.path()).unwrap();
        let conf =
            std::fs::read_to_string(d.path().join("etc/initramfs-tools/conf.d/stemforge.conf"))
                .unwrap();
        assert!(conf.contains("FSTYPE=ext4"));
    }

    #[test]
    fn cache_key_follows_inputs_and_archive() {
        let p = load("debian-bookworm", &ProfileSource::Embedded).unwrap();
        let a = BootstrapSpec::new(&p, &MirrorOverrides::default(), vec!["a".into()], vec![]);
        let b = BootstrapSpec::new(
            &p,
            &MirrorOverrides::default(),
            vec!["a".into(), "b".into()],
            vec![],
        );
        let c = BootstrapSpec::new(
            &p,
            &MirrorOverrides::default(),
            vec!["a".into()],
            vec![("/etc/x".into(), "y".into())],
        );
        let r1 = vec![b"release-1".to_vec()];
        let r2 = vec![b"release-2".to_vec()];
        assert_eq!(a.cache_key(&r1), a.cache_key(&r1));
        assert_ne!(a.cache_key(&r1), b.cache_key(&r1));
        assert_ne!(a.cache_key(&r1), c.cache_key(&r1));
        assert_ne!(a.cache_key(&r1), a.cache_key(&r2));
    }
}
