//! Upload metadata beside the disks: `NAME.aws.json` (everything
//! `aws ec2 import-snapshot` and `register-image` need, with the raw disk)
//! and `NAME.openstack.json` (Glance properties, with the qcow2).

use super::bosh::{self, Iaas};
use super::stemcell::spec;
use super::{Artifact, Format, Job, Producer, Products, input};
use crate::fsutil;
use anyhow::Result;

/// `NAME.aws.json`.
pub struct Aws;
/// `NAME.openstack.json`.
pub struct Openstack;

impl Producer for Aws {
    fn format(&self) -> Format {
        Format::Aws
    }

    fn needs(&self) -> &'static [Format] {
        &[Format::Raw]
    }

    fn files(&self, name: &str) -> Vec<String> {
        vec![format!("{name}.aws.json")]
    }

    fn produce(&self, job: &Job, inputs: &Products) -> Result<(Vec<Artifact>, String)> {
        let raw = input(inputs, Format::Raw, ".raw")?;
        let gib = raw.size.div_ceil(1 << 30);
        let body = bosh::aws_json(&spec(job, Iaas::Aws), &raw.file_name(), gib)?;
        let out = job.named(Format::Aws, "aws.json");
        fsutil::write_atomic(&out, &body)?;
        Ok((
            vec![Artifact::of(Format::Aws, &out)?],
            format!("{gib} GiB volume"),
        ))
    }
}

impl Producer for Openstack {
    fn format(&self) -> Format {
        Format::Openstack
    }

    fn needs(&self) -> &'static [Format] {
        &[Format::Qcow2]
    }

    fn files(&self, name: &str) -> Vec<String> {
        vec![format!("{name}.openstack.json")]
    }

    fn produce(&self, job: &Job, inputs: &Products) -> Result<(Vec<Artifact>, String)> {
        let qcow2 = input(inputs, Format::Qcow2, ".qcow2")?;
        let agent = job.tree.join("usr/sbin/qemu-ga").exists();
        let body = bosh::openstack_json(&spec(job, Iaas::Openstack), &qcow2.file_name(), agent)?;
        let out = job.named(Format::Openstack, "openstack.json");
        fsutil::write_atomic(&out, &body)?;
        Ok((
            vec![Artifact::of(Format::Openstack, &out)?],
            "glance properties".into(),
        ))
    }
}
