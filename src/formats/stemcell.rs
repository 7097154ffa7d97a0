//! The three BOSH stemcells (aws, vsphere, openstack): each wraps the
//! image its IaaS boots (raw, OVF + VMDK, qcow2) with `stemcell.MF`, the
//! package list and both SBOMs. The tarball layout is [`super::bosh`]'s.

use super::bosh::{self, Extras, Iaas, StemcellSpec};
use super::{Artifact, Format, Job, Producer, Products, input};
use crate::config::format_size;
use anyhow::{Context, Result};
use std::path::Path;

/// A stemcell producer: one per IaaS.
pub struct Stemcell(pub Iaas);

pub const AWS: Stemcell = Stemcell(Iaas::Aws);
pub const VSPHERE: Stemcell = Stemcell(Iaas::Vsphere);
pub const OPENSTACK: Stemcell = Stemcell(Iaas::Openstack);

/// The stemcell description of a build for `iaas`.
pub fn spec(job: &Job, iaas: Iaas) -> StemcellSpec {
    let os = &job.profile.os;
    StemcellSpec {
        iaas,
        version: job.version.to_string(),
        os_name: format!("{}-{}", os.distro, os.codename),
        distro: os.distro.clone(),
        distro_version: os.version.clone(),
        disk_mib: job.profile.disk.size >> 20,
        // A hybrid disk boots either way: AWS picks UEFI where the
        // instance type has it, legacy BIOS elsewhere.
        boot_mode: if job.profile.boot.bios {
            "uefi-preferred"
        } else {
            "uefi"
        }
        .into(),
        agent: job.bosh_agent.map(str::to_string),
        epoch: job.epoch,
    }
}

impl Producer for Stemcell {
    fn format(&self) -> Format {
        match self.0 {
            Iaas::Aws => Format::StemcellAws,
            Iaas::Vsphere => Format::StemcellVsphere,
            Iaas::Openstack => Format::StemcellOpenstack,
        }
    }

    fn needs(&self) -> &'static [Format] {
        match self.0 {
            Iaas::Aws => &[Format::Raw, Format::Sbom],
            Iaas::Vsphere => &[Format::Vmdk, Format::Ova, Format::Sbom],
            Iaas::Openstack => &[Format::Qcow2, Format::Sbom],
        }
    }

    fn files(&self, name: &str) -> Vec<String> {
        self.files_for(name, "VERSION", "OS")
    }

    fn files_for(&self, _: &str, version: &str, os: &str) -> Vec<String> {
        vec![format!(
            "bosh-stemcell-{version}-{}-{}-{os}-go_agent.tgz",
            self.0.infrastructure(),
            self.0.name_hypervisor()
        )]
    }

    fn produce(&self, job: &Job, inputs: &Products) -> Result<(Vec<Artifact>, String)> {
        let spec = spec(job, self.0);
        let format = self.format();
        let image = job.work.join(format!("{}.image", spec.name()));
        match self.0 {
            Iaas::Aws => {
                let raw = input(inputs, Format::Raw, ".raw")?;
                bosh::image_tarball(&[("root.img", &raw.path)], &image, job.epoch)?;
            }
            Iaas::Openstack => {
                let qcow2 = input(inputs, Format::Qcow2, ".qcow2")?;
                bosh::image_tarball(&[("root.img", &qcow2.path)], &image, job.epoch)?;
            }
            Iaas::Vsphere => {
                let ovf = input(inputs, Format::Ova, ".ovf")?;
                let vmdk = input(inputs, Format::Vmdk, ".vmdk")
                    .context("the vSphere stemcell needs the VMDK")?;
                let mf = job.work.join(format!("{}.mf", job.name));
                let ovf_name = ovf.file_name();
                let vmdk_name = vmdk.file_name();
                let text = super::vmware::manifest(&[
                    (ovf_name.as_str(), &ovf.path),
                    (vmdk_name.as_str(), &vmdk.path),
                ])?;
                crate::fsutil::write_atomic(&mf, text.as_bytes())?;
                let mf_name = format!("{}.mf", job.name);
                bosh::image_tarball(
                    &[
                        (ovf_name.as_str(), &ovf.path),
                        (mf_name.as_str(), &mf),
                        (vmdk_name.as_str(), &vmdk.path),
                    ],
                    &image,
                    job.epoch,
                )?;
            }
        }
        let read = |suffix: &str| -> Result<Vec<u8>> {
            let a = input(inputs, Format::Sbom, suffix)?;
            std::fs::read(&a.path).with_context(|| format!("reading {}", a.path.display()))
        };
        let packages_txt = read(".packages.txt")?;
        let spdx = read(".spdx.json")?;
        let cdx = read(".cdx.json")?;
        let dev_tools = dev_tools_file_list(job.tree)?;
        let extras = Extras {
            packages_txt: &packages_txt,
            dev_tools_file_list: dev_tools.as_bytes(),
            sbom_spdx: &spdx,
            sbom_cyclonedx: &cdx,
        };
        let out = job.path(format, &spec.file_name());
        bosh::stemcell(&spec, &image, &extras, &out)?;
        std::fs::remove_file(&image).with_context(|| format!("removing {}", image.display()))?;
        let a = Artifact::of(format, &out)?;
        let note = format_size(a.size);
        Ok((vec![a], note))
    }
}

/// Packages BOSH counts as development tools: compilers, build systems and
/// headers. A stemcell lists their files so an operator can strip them.
fn is_dev_tool(package: &str) -> bool {
    const TOOLS: &[&str] = &[
        "autoconf",
        "automake",
        "binutils",
        "bison",
        "build-essential",
        "cpp",
        "flex",
        "g++",
        "gcc",
        "libtool",
        "make",
        "pkg-config",
        "pkgconf",
    ];
    let base = package.split(':').next().unwrap_or(package);
    let unversioned = base.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
    TOOLS.contains(&base) || TOOLS.contains(&unversioned) || base.ends_with("-dev")
}

/// The files of the image's development tool packages, one per line, from
/// dpkg's file lists (`var/lib/dpkg/info/PACKAGE.list`).
pub fn dev_tools_file_list(tree: &Path) -> Result<String> {
    let info = tree.join("var/lib/dpkg/info");
    let mut lists: Vec<_> = std::fs::read_dir(&info)
        .with_context(|| format!("listing {}", info.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.strip_suffix(".list").is_some_and(is_dev_tool))
        .collect();
    lists.sort();
    let mut out = String::new();
    for name in lists {
        let path = info.join(&name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for line in text.lines().filter(|l| !l.is_empty() && *l != "/.") {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_tools_are_compilers_build_tools_and_headers() {
        for p in [
            "gcc-12",
            "gcc",
            "cpp-12",
            "make",
            "libc6-dev",
            "libssl-dev:amd64",
            "g++-12",
        ] {
            assert!(is_dev_tool(p), "{p}");
        }
        for p in [
            "openssh-server",
            "libgcc-s1",
            "makedev",
            "cloud-init",
            "devscripts",
        ] {
            assert!(!is_dev_tool(p), "{p}");
        }
    }

    #[test]
    fn the_file_list_comes_from_dpkg() {
        let d = tempfile::tempdir().unwrap();
        let info = d.path().join("var/lib/dpkg/info");
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(info.join("make.list"), "/.\n/usr\n/usr/bin/make\n").unwrap();
        std::fs::write(info.join("sudo.list"), "/.\n/usr/bin/sudo\n").unwrap();
        let list = dev_tools_file_list(d.path()).unwrap();
        assert_eq!(list, "/usr\n/usr/bin/make\n");
        assert!(dev_tools_file_list(&d.path().join("nope")).is_err());
    }
}
