//! Output formats. The disk phase makes one raw GPT disk; every other
//! output is made from it (or from another output) by one producer, each in
//! its own module. A producer says which outputs it needs; the formats phase
//! runs every producer whose inputs are ready at the same time, so
//! independent conversions share the cores. Every file is written under a
//! temporary name and renamed when complete.

pub mod bosh;
pub mod cloud;
pub mod manifest;
pub mod qcow2;
pub mod raw;
pub mod sbom;
pub mod stemcell;
pub mod vmware;

use crate::config::ConfigError;
use crate::profile::Profile;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One kind of output. `--format` takes these names (comma-separated), and
/// the group names `stemcells` (the three BOSH stemcells) and `all`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The GPT disk image itself (sparse)
    Raw,
    /// Compressed qcow2 for QEMU/KVM
    Qcow2,
    /// streamOptimized VMDK for vSphere
    Vmdk,
    /// OVF envelope and OVA archive for vSphere
    Ova,
    /// The raw disk plus NAME.aws.json for EC2 import
    Aws,
    /// The qcow2 plus NAME.openstack.json for Glance
    Openstack,
    /// SPDX 2.3 and CycloneDX 1.6 SBOMs from the image's dpkg database
    Sbom,
    /// BOSH stemcell for AWS
    StemcellAws,
    /// BOSH stemcell for vSphere
    StemcellVsphere,
    /// BOSH stemcell for OpenStack
    StemcellOpenstack,
}

impl Format {
    pub const ALL: [Format; 10] = [
        Format::Raw,
        Format::Qcow2,
        Format::Vmdk,
        Format::Ova,
        Format::Aws,
        Format::Openstack,
        Format::Sbom,
        Format::StemcellAws,
        Format::StemcellVsphere,
        Format::StemcellOpenstack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Ova => "ova",
            Format::Aws => "aws",
            Format::Openstack => "openstack",
            Format::Sbom => "sbom",
            Format::StemcellAws => "stemcell-aws",
            Format::StemcellVsphere => "stemcell-vsphere",
            Format::StemcellOpenstack => "stemcell-openstack",
        }
    }

    /// Parse one `--format` or profile `formats:` word; groups expand.
    pub fn parse_list(words: &[String], origin: &str) -> Result<Vec<Format>, ConfigError> {
        let mut out = BTreeSet::new();
        for w in words.iter().flat_map(|w| w.split(',')) {
            let w = w.trim();
            match w {
                "all" => out.extend(Format::ALL),
                "stemcells" => out.extend([
                    Format::StemcellAws,
                    Format::StemcellVsphere,
                    Format::StemcellOpenstack,
                ]),
                _ => match Format::ALL.iter().find(|f| f.name() == w) {
                    Some(f) => {
                        out.insert(*f);
                    }
                    None => {
                        let known: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
                        return Err(ConfigError::new(
                            origin,
                            format!(
                                "unknown format `{w}` (formats: {}, or the groups stemcells, all)",
                                known.join(", ")
                            ),
                        ));
                    }
                },
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The formats a build must make to write `wanted`: the wanted ones and
    /// everything they are made from.
    pub fn closure(wanted: &[Format]) -> BTreeSet<Format> {
        let mut all: BTreeSet<Format> = wanted.iter().copied().collect();
        loop {
            let more: Vec<Format> = all
                .iter()
                .flat_map(|f| producer(*f).needs().iter().copied())
                .filter(|f| !all.contains(f))
                .collect();
            if more.is_empty() {
                return all;
            }
            all.extend(more);
        }
    }
}

/// An output file and its size.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Artifact {
    pub format: Format,
    pub path: PathBuf,
    /// Bytes the file occupies on disk (sparse files count their data).
    pub disk_usage: u64,
    /// Apparent size (the virtual disk size for raw).
    pub size: u64,
}

impl Artifact {
    pub fn of(format: Format, path: &Path) -> Result<Artifact> {
        use std::os::unix::fs::MetadataExt;
        let md = path
            .metadata()
            .with_context(|| format!("stat {}", path.display()))?;
        Ok(Artifact {
            format,
            path: path.to_path_buf(),
            disk_usage: md.blocks() * 512,
            size: md.len(),
        })
    }

    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// What every producer may read: the build's identity and its places.
pub struct Job<'a> {
    /// Base name of the outputs.
    pub name: &'a str,
    pub profile: &'a Profile,
    /// The image's version (stemcell version, SBOM and OVF product version).
    pub version: &'a str,
    /// The finished, hardened root tree.
    pub tree: &'a Path,
    /// apt's package indexes of the bootstrapped tree (.deb checksums).
    pub apt_lists: Option<&'a Path>,
    /// The raw disk the disk phase wrote (a temporary name in `work`).
    pub disk: &'a Path,
    pub out_dir: &'a Path,
    pub work: &'a Path,
    /// The formats the user asked for; the others are intermediates.
    pub wanted: &'a BTreeSet<Format>,
    /// SOURCE_DATE_EPOCH: member times and SBOM creation time.
    pub epoch: i64,
    /// A hash of every input: SBOM namespaces and serial numbers.
    pub input_hash: &'a str,
    /// The BOSH agent installed in the image, if any (its version).
    pub bosh_agent: Option<&'a str>,
}

impl Job<'_> {
    /// Where a file of `format` goes: the output directory when the user
    /// asked for the format, otherwise the work directory (an
    /// intermediate that disappears with it).
    pub fn path(&self, format: Format, file_name: &str) -> PathBuf {
        if self.wanted.contains(&format) {
            self.out_dir.join(file_name)
        } else {
            self.work.join(file_name)
        }
    }

    /// `NAME.suffix` at [`Job::path`].
    pub fn named(&self, format: Format, suffix: &str) -> PathBuf {
        self.path(format, &format!("{}.{suffix}", self.name))
    }
}

/// The files each finished producer made, by format.
pub type Products = BTreeMap<Format, Vec<Artifact>>;

/// Makes one format's files from the raw disk and the other products.
pub trait Producer: Sync {
    fn format(&self) -> Format;
    /// The formats whose products this one reads.
    fn needs(&self) -> &'static [Format] {
        &[]
    }
    /// The files it writes to the output directory, for the plan.
    fn files(&self, name: &str) -> Vec<String>;
    /// [`Producer::files`] for outputs whose names carry more than the
    /// image's name.
    fn files_for(&self, name: &str, _version: &str, _os: &str) -> Vec<String> {
        self.files(name)
    }
    /// Make the files; a short note for the step summary with them.
    fn produce(&self, job: &Job, inputs: &Products) -> Made;
}

/// The producer of each format: one module each.
pub fn producer(f: Format) -> &'static dyn Producer {
    match f {
        Format::Raw => &raw::Raw,
        Format::Qcow2 => &qcow2::Qcow2,
        Format::Vmdk => &vmware::Vmdk,
        Format::Ova => &vmware::Ova,
        Format::Aws => &cloud::Aws,
        Format::Openstack => &cloud::Openstack,
        Format::Sbom => &sbom::Sbom,
        Format::StemcellAws => &stemcell::AWS,
        Format::StemcellVsphere => &stemcell::VSPHERE,
        Format::StemcellOpenstack => &stemcell::OPENSTACK,
    }
}

/// One producer's run, for the step summary.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Timing {
    pub format: Format,
    pub seconds: f64,
    pub note: String,
}

/// What a producer returns: its files and a note for the step summary.
pub type Made = Result<(Vec<Artifact>, String)>;

/// Run the producers of `closure` (see [`Format::closure`]), each as soon
/// as its inputs exist, side by side. Returns every product (intermediates
/// included) and each producer's time. The first failure stops new work;
/// the producers already running finish before it is returned.
pub fn produce_all(job: &Job, closure: &BTreeSet<Format>) -> Result<(Products, Vec<Timing>)> {
    let mut products = Products::new();
    let mut timings = Vec::new();
    let mut pending: Vec<Format> = closure.iter().copied().collect();
    let (tx, rx) = std::sync::mpsc::channel::<(Format, Made, f64)>();
    std::thread::scope(|s| -> Result<()> {
        let mut running = 0usize;
        let mut failure: Option<anyhow::Error> = None;
        loop {
            if failure.is_none() {
                let (ready, waiting): (Vec<Format>, Vec<Format>) = pending.iter().partition(|f| {
                    producer(**f)
                        .needs()
                        .iter()
                        .all(|n| products.contains_key(n))
                });
                pending = waiting;
                for f in ready {
                    // Each producer sees the products that existed when it
                    // started: everything it needs.
                    let inputs: Products = producer(f)
                        .needs()
                        .iter()
                        .map(|n| (*n, products[n].clone()))
                        .collect();
                    let tx = tx.clone();
                    running += 1;
                    s.spawn(move || {
                        let t0 = Instant::now();
                        // A panic becomes an error, so the loop below
                        // always hears back from every producer.
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            producer(f).produce(job, &inputs)
                        }))
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("the producer panicked")))
                        .with_context(|| format!("writing the {} output", f.name()));
                        let _ = tx.send((f, r, t0.elapsed().as_secs_f64()));
                    });
                }
            }
            if running == 0 {
                break;
            }
            let (f, r, seconds) = rx.recv().context("a format producer vanished")?;
            running -= 1;
            match r {
                Ok((artifacts, note)) => {
                    crate::progress::info(&format!("    {}: {seconds:.1} s ({note})", f.name()));
                    timings.push(Timing {
                        format: f,
                        seconds,
                        note,
                    });
                    products.insert(f, artifacts);
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        anyhow::ensure!(
            pending.is_empty(),
            "formats {pending:?} wait for inputs nobody makes"
        );
        Ok(())
    })?;
    Ok((products, timings))
}

/// The one artifact of `format` among `products` whose file name ends with
/// `suffix`.
pub fn input<'a>(products: &'a Products, format: Format, suffix: &str) -> Result<&'a Artifact> {
    products
        .get(&format)
        .and_then(|v| v.iter().find(|a| a.file_name().ends_with(suffix)))
        .with_context(|| format!("no {suffix} among the {} products", format.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_expand_and_unknown_formats_are_named() {
        let all = Format::parse_list(&["all".into()], "--format").unwrap();
        assert_eq!(all.len(), Format::ALL.len());
        let s = Format::parse_list(&["raw,stemcells".into()], "--format").unwrap();
        assert_eq!(s.len(), 4);
        let e = Format::parse_list(&["raw,vhdx".into()], "--format").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("--format") && msg.contains("vhdx"), "{msg}");
        assert!(msg.contains("stemcell-vsphere"), "{msg}");
    }

    #[test]
    fn closures_pull_in_inputs() {
        let c = Format::closure(&[Format::StemcellVsphere]);
        for f in [Format::Raw, Format::Vmdk, Format::Ova, Format::Sbom] {
            assert!(c.contains(&f), "{f:?} missing from {c:?}");
        }
        assert!(!c.contains(&Format::Qcow2));
        let c = Format::closure(&[Format::Openstack]);
        assert!(c.contains(&Format::Qcow2) && c.contains(&Format::Raw));
    }

    #[test]
    fn every_format_has_its_producer() {
        for f in Format::ALL {
            assert_eq!(producer(f).format(), f);
            for n in producer(f).needs() {
                assert_ne!(*n, f, "{f:?} needs itself");
            }
        }
    }
}
