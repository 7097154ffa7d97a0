//! The raw GPT disk as the disk phase wrote it (sparse). Wanted, it moves
//! from the work directory to the output directory; otherwise the other
//! producers read it where it is.

use super::{Artifact, Format, Job, Producer, Products};
use crate::config::format_size;
use crate::fsutil;
use anyhow::Result;

pub struct Raw;

impl Producer for Raw {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn files(&self, name: &str) -> Vec<String> {
        vec![format!("{name}.raw")]
    }

    fn produce(&self, job: &Job, _: &Products) -> Result<(Vec<Artifact>, String)> {
        let path = job.named(Format::Raw, "raw");
        if path != job.disk {
            fsutil::commit(job.disk, &path)?;
        }
        let a = Artifact::of(Format::Raw, &path)?;
        let note = format!(
            "{} virtual, {} on disk",
            format_size(a.size),
            format_size(a.disk_usage)
        );
        Ok((vec![a], note))
    }
}
