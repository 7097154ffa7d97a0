//! BOSH stemcell tarballs (aws, vsphere, openstack) and the upload metadata
//! for EC2 (`NAME.aws.json`) and Glance (`NAME.openstack.json`).
//!
//! # What BOSH expects
//!
//! These facts come from BOSH's own stemcell builder
//! (bosh-linux-stemcell-builder: `StemcellPackager`, `Infrastructure`,
//! `Definition`, the `prepare_*_image_stemcell` stages) and from the
//! programs that read stemcells (bosh-cli's stemcell reader and the AWS,
//! OpenStack and vSphere CPIs):
//!
//! - A stemcell is a gzip-compressed tar whose top level holds exactly
//!   `stemcell.MF`, `packages.txt`, `dev_tools_file_list.txt`, `image`,
//!   `sbom.spdx.json` and `sbom.cdx.json`, in that order (the builder
//!   refuses a missing or an extra file).
//! - It is named `bosh-stemcell-VERSION-IAAS-HYPERVISOR-OS-go_agent.tgz`;
//!   the name inside is `bosh-IAAS-HYPERVISOR-OS-go_agent`. HYPERVISOR in
//!   these names is `xen-hvm` for aws, `esxi` for vsphere and `kvm` for
//!   openstack, while `cloud_properties.hypervisor` says `xen`, `esxi` and
//!   `kvm`. OS is `NAME-VERSION` (`ubuntu-jammy`); the Director matches a
//!   deployment's `stemcells: [{os: ...}]` against it.
//! - `image` is itself a gzip tar: for aws it holds the raw disk as
//!   `root.img`; for openstack it holds the qcow2, also named `root.img`
//!   (the builder hard-links `root.qcow2` to that name, and the OpenStack
//!   CPI refuses an image without `root.img`); for vsphere it holds the OVF
//!   descriptor, its manifest and the disk (`image.ovf`, `image.mf`,
//!   `image-disk1.vmdk`), and the vSphere CPI imports the first `*.ovf` it
//!   finds. Every CPI unpacks it with `tar -xzf`.
//! - `stemcell.MF` carries `name`, `version` (a string), `bosh_protocol`
//!   (1), `api_version` (3), `sha1` (the SHA-1 of the `image` member),
//!   `operating_system`, `stemcell_formats` (the CPI formats it can be
//!   uploaded to: `aws-raw`, `vsphere-ovf`, `openstack-qcow2`, ...) and
//!   `cloud_properties`, which the Director hands to the CPI's
//!   `create_stemcell`: `name`, `version`, `infrastructure`, `hypervisor`,
//!   `disk` (MiB), `disk_format` (`raw`, `ovf`, `qcow2`),
//!   `container_format` (`bare`), `os_type` (`linux`), `os_distro`,
//!   `architecture` (`x86_64`) and per-IaaS keys (`root_device_name`;
//!   `auto_disk_config` for openstack).
//! - bosh-cli reads the manifest with Go's yaml.v2 into string fields for
//!   name, version, operating_system, sha1 and bosh_protocol and an int
//!   for api_version; the Director reads it with Ruby's Psych. Both speak
//!   YAML 1.1, where plain `yes`, `on`, `0755` or `1:20` are not strings;
//!   serde_yaml quotes by YAML 1.2 rules and would leave them plain. So
//!   every string in `stemcell.MF` is written double-quoted.
//! - The AWS CPI registers an HVM AMI with root device `/dev/xvda`, ENA on,
//!   and `boot_mode` from `cloud_properties` (legacy BIOS when absent), so
//!   a UEFI image must say so. The OpenStack CPI copies only a fixed list
//!   of `cloud_properties` into Glance (version, os_type, os_distro,
//!   architecture, auto_disk_config, hw_vif_model, hw_disk_bus, hypervisor
//!   as hypervisor_type, ...): `hw_firmware_type` is recorded here but the
//!   CPI does not pass it on; `NAME.openstack.json` carries the full set.
//!
//! Without a BOSH agent in the image the stemcell is still complete and
//! well-formed: the build warns and `stemcell.MF` says
//! `bosh_agent: {installed: false}`.
//!
//! # Compression
//!
//! Both tar levels are written through one parallel gzip writer: the
//! stream is cut into 4 MiB chunks that every core deflates on its own
//! (pigz-style, one gzip member that any gzip reader, including Go's
//! compress/gzip, reads). An all-zero chunk (the unused space of a sparse
//! disk) is deflated once and reused, and a chunk that deflate cannot
//! shrink (qcow2 and streamOptimized VMDK data, the inner `image`) is
//! stored, so the work goes where it pays. The output depends on the
//! input only, never on the number of cores.

use crate::config::ConfigError;
use crate::exec::shell_quote;
use crate::fsutil;
use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use sha1::Sha1;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

/// The clouds a stemcell is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Iaas {
    Aws,
    Vsphere,
    Openstack,
}

impl Iaas {
    pub const ALL: [Iaas; 3] = [Iaas::Aws, Iaas::Vsphere, Iaas::Openstack];

    /// `cloud_properties.infrastructure`, and the IAAS part of the names.
    pub fn infrastructure(self) -> &'static str {
        match self {
            Iaas::Aws => "aws",
            Iaas::Vsphere => "vsphere",
            Iaas::Openstack => "openstack",
        }
    }

    /// `cloud_properties.hypervisor`.
    pub fn hypervisor(self) -> &'static str {
        match self {
            Iaas::Aws => "xen",
            Iaas::Vsphere => "esxi",
            Iaas::Openstack => "kvm",
        }
    }

    /// The HYPERVISOR part of the stemcell's name and file name.
    pub fn name_hypervisor(self) -> &'static str {
        match self {
            Iaas::Aws => "xen-hvm",
            other => other.hypervisor(),
        }
    }

    /// The one entry of `stemcell_formats`: the CPI format of `image`.
    pub fn stemcell_format(self) -> &'static str {
        match self {
            Iaas::Aws => "aws-raw",
            Iaas::Vsphere => "vsphere-ovf",
            Iaas::Openstack => "openstack-qcow2",
        }
    }

    /// `cloud_properties.disk_format`.
    pub fn disk_format(self) -> &'static str {
        match self {
            Iaas::Aws => "raw",
            Iaas::Vsphere => "ovf",
            Iaas::Openstack => "qcow2",
        }
    }

    /// The whole-disk device the root disk appears as: the EBS mapping of
    /// an HVM AMI, the first SCSI disk on ESXi, the virtio disk on KVM.
    /// (BOSH's builder writes `/dev/sda1`, a paravirtual-era name the AWS
    /// CPI uses only for paravirtual AMIs; the root file system of this
    /// layout is not partition 1 anyway.)
    pub fn root_device_name(self) -> &'static str {
        match self {
            Iaas::Aws => "/dev/xvda",
            Iaas::Vsphere => "/dev/sda",
            Iaas::Openstack => "/dev/vda",
        }
    }

    /// Parse the value of `flag` (a command-line flag or a profile key);
    /// an unknown name is a [`ConfigError`] naming the flag, the value and
    /// the valid names (exit code 2, before any work starts).
    pub fn parse(flag: &str, value: &str) -> Result<Iaas, ConfigError> {
        Iaas::ALL
            .into_iter()
            .find(|i| i.infrastructure() == value)
            .ok_or_else(|| {
                let known: Vec<&str> = Iaas::ALL.iter().map(|i| i.infrastructure()).collect();
                ConfigError::new(
                    flag,
                    format!("unknown IaaS `{value}` (IaaS names: {})", known.join(", ")),
                )
            })
    }
}

/// What a stemcell says about itself.
#[derive(Clone, Debug, Serialize)]
pub struct StemcellSpec {
    pub iaas: Iaas,
    /// The stemcell version (a string, `"1.5"` stays `"1.5"`).
    pub version: String,
    /// `operating_system`, e.g. `debian-bookworm`.
    pub os_name: String,
    /// `os_distro` (`debian`, `ubuntu`).
    pub distro: String,
    /// The distribution's version (`12`, `24.04`).
    pub distro_version: String,
    /// Size of the root disk in MiB (`cloud_properties.disk`).
    pub disk_mib: u64,
    /// `uefi`, or `uefi-preferred` for a hybrid BIOS+UEFI disk.
    pub boot_mode: String,
    /// The BOSH agent's version, when the image has one.
    pub agent: Option<String>,
    /// Modification time of every tar member (SOURCE_DATE_EPOCH).
    pub epoch: i64,
}

impl StemcellSpec {
    /// `bosh-IAAS-HYPERVISOR-OS-go_agent`.
    pub fn name(&self) -> String {
        format!(
            "bosh-{}-{}-{}-go_agent",
            self.iaas.infrastructure(),
            self.iaas.name_hypervisor(),
            self.os_name
        )
    }

    /// `bosh-stemcell-VERSION-IAAS-HYPERVISOR-OS-go_agent.tgz`.
    pub fn file_name(&self) -> String {
        format!(
            "bosh-stemcell-{}-{}-{}-{}-go_agent.tgz",
            self.version,
            self.iaas.infrastructure(),
            self.iaas.name_hypervisor(),
            self.os_name
        )
    }

    fn check(&self) -> Result<()> {
        for (what, value) in [
            ("version", &self.version),
            ("operating system name", &self.os_name),
            ("distribution", &self.distro),
            ("distribution version", &self.distro_version),
        ] {
            ensure!(
                !value.is_empty()
                    && value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._+~-".contains(c)),
                "stemcell {what} `{value}` must be letters, digits and . _ + ~ - \
                 (it is part of file and image names)"
            );
        }
        ensure!(
            matches!(self.boot_mode.as_str(), "uefi" | "uefi-preferred"),
            "stemcell boot mode `{}` must be uefi or uefi-preferred",
            self.boot_mode
        );
        ensure!(self.disk_mib > 0, "stemcell disk size is 0 MiB");
        ensure!(self.epoch >= 0, "member time {} is before 1970", self.epoch);
        Ok(())
    }
}

/// The files a stemcell carries next to its image.
#[derive(Clone, Copy)]
pub struct Extras<'a> {
    /// The installed packages and their versions (`dpkg -l`).
    pub packages_txt: &'a [u8],
    /// The files of development tools a hardened stemcell may remove.
    pub dev_tools_file_list: &'a [u8],
    /// SPDX 2.3 JSON.
    pub sbom_spdx: &'a [u8],
    /// CycloneDX JSON.
    pub sbom_cyclonedx: &'a [u8],
}

/// The top-level members of a stemcell, in BOSH's order.
pub const STEMCELL_MEMBERS: [&str; 6] = [
    "stemcell.MF",
    "packages.txt",
    "dev_tools_file_list.txt",
    "image",
    "sbom.spdx.json",
    "sbom.cdx.json",
];

#[derive(Serialize)]
struct Manifest<'a> {
    name: String,
    version: &'a str,
    bosh_protocol: u32,
    api_version: u32,
    sha1: &'a str,
    operating_system: &'a str,
    stemcell_formats: [&'static str; 1],
    cloud_properties: CloudProperties<'a>,
    bosh_agent: AgentRecord<'a>,
}

#[derive(Serialize)]
struct CloudProperties<'a> {
    name: String,
    version: &'a str,
    infrastructure: &'static str,
    hypervisor: &'static str,
    disk: u64,
    disk_format: &'static str,
    container_format: &'static str,
    os_type: &'static str,
    os_distro: &'a str,
    os_version: &'a str,
    architecture: &'static str,
    root_device_name: &'static str,
    #[serde(flatten)]
    aws: Option<AwsProperties<'a>>,
    #[serde(flatten)]
    openstack: Option<OpenstackProperties>,
}

#[derive(Serialize)]
struct AwsProperties<'a> {
    virtualization_type: &'static str,
    boot_mode: &'a str,
}

#[derive(Serialize)]
struct OpenstackProperties {
    auto_disk_config: bool,
    hw_firmware_type: &'static str,
    hw_machine_type: &'static str,
    hw_disk_bus: &'static str,
    hw_vif_model: &'static str,
}

#[derive(Serialize)]
struct AgentRecord<'a> {
    installed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
}

/// `stemcell.MF` for `spec` and an `image` member whose SHA-1 is
/// `image_sha1` (40 lowercase hex digits). Every string is double-quoted,
/// numbers and booleans are plain.
pub fn stemcell_mf(spec: &StemcellSpec, image_sha1: &str) -> Result<String> {
    spec.check()?;
    ensure!(
        image_sha1.len() == 40
            && image_sha1
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "image SHA-1 `{image_sha1}` is not 40 lowercase hex digits"
    );
    let iaas = spec.iaas;
    let manifest = Manifest {
        name: spec.name(),
        version: &spec.version,
        bosh_protocol: 1,
        api_version: 3,
        sha1: image_sha1,
        operating_system: &spec.os_name,
        stemcell_formats: [iaas.stemcell_format()],
        cloud_properties: CloudProperties {
            name: spec.name(),
            version: &spec.version,
            infrastructure: iaas.infrastructure(),
            hypervisor: iaas.hypervisor(),
            disk: spec.disk_mib,
            disk_format: iaas.disk_format(),
            container_format: "bare",
            os_type: "linux",
            os_distro: &spec.distro,
            os_version: &spec.distro_version,
            architecture: "x86_64",
            root_device_name: iaas.root_device_name(),
            aws: (iaas == Iaas::Aws).then_some(AwsProperties {
                virtualization_type: "hvm",
                boot_mode: &spec.boot_mode,
            }),
            openstack: (iaas == Iaas::Openstack).then_some(OpenstackProperties {
                auto_disk_config: true,
                hw_firmware_type: "uefi",
                hw_machine_type: "q35",
                hw_disk_bus: "virtio",
                hw_vif_model: "virtio",
            }),
        },
        bosh_agent: AgentRecord {
            installed: spec.agent.is_some(),
            version: spec.agent.as_deref(),
        },
    };
    quoted_yaml(&manifest)
}

/// Serialize `value` as a block-style YAML document in which every string
/// scalar is double-quoted. The tree comes from serde_yaml, the text from
/// libyaml's emitter (which, unlike serde_yaml, takes a style per scalar),
/// and serde_yaml reads the text back to prove it means the same tree.
fn quoted_yaml<T: Serialize>(value: &T) -> Result<String> {
    use libyaml_safer::{Emitter, Encoding, Event};
    let tree = serde_yaml::to_value(value).context("building the YAML document")?;
    let mut out = Vec::new();
    {
        let mut emitter = Emitter::new();
        emitter.set_output(&mut out);
        emitter.set_width(-1);
        emitter.set_unicode(true);
        let mut emit = |e: Event| emitter.emit(e).context("writing YAML");
        emit(Event::stream_start(Encoding::Utf8))?;
        emit(Event::document_start(None, &[], false))?;
        emit_node(&mut emit, &tree)?;
        emit(Event::document_end(true))?;
        emit(Event::stream_end())?;
    }
    let text = String::from_utf8(out).context("the YAML emitter wrote invalid UTF-8")?;
    let back: serde_yaml::Value =
        serde_yaml::from_str(&text).context("reading back the YAML just written")?;
    ensure!(back == tree, "the YAML text does not read back as written");
    Ok(text)
}

fn emit_node(
    emit: &mut impl FnMut(libyaml_safer::Event) -> Result<()>,
    node: &serde_yaml::Value,
) -> Result<()> {
    use libyaml_safer::{Event, MappingStyle, ScalarStyle, SequenceStyle};
    use serde_yaml::Value;
    let plain = |text: &str| Event::scalar(None, None, text, true, false, ScalarStyle::Plain);
    match node {
        Value::Mapping(map) => {
            emit(Event::mapping_start(None, None, true, MappingStyle::Block))?;
            for (key, value) in map {
                let key = key.as_str().context("a YAML key that is not a string")?;
                emit(Event::scalar(None, None, key, true, true, ScalarStyle::Any))?;
                emit_node(emit, value)?;
            }
            emit(Event::mapping_end())
        }
        Value::Sequence(items) => {
            emit(Event::sequence_start(
                None,
                None,
                true,
                SequenceStyle::Block,
            ))?;
            for item in items {
                emit_node(emit, item)?;
            }
            emit(Event::sequence_end())
        }
        Value::String(s) => emit(Event::scalar(
            None,
            None,
            s,
            false,
            true,
            ScalarStyle::DoubleQuoted,
        )),
        Value::Number(n) => emit(plain(&n.to_string())),
        Value::Bool(b) => emit(plain(if *b { "true" } else { "false" })),
        Value::Null => emit(plain("null")),
        Value::Tagged(_) => bail!("tagged YAML values are not written"),
    }
}

/// The inner `image` of a stemcell: a gzip tar holding `members` (name in
/// the archive, file to read) at its top level, in the order given (a
/// vSphere image keeps its `.ovf` first, as in an OVA). Written under a
/// temporary name and renamed when complete.
pub fn image_tarball(members: &[(&str, &Path)], out: &Path, epoch: i64) -> Result<()> {
    let members: Vec<(&str, Source)> = members
        .iter()
        .map(|(name, path)| (*name, Source::File(path)))
        .collect();
    write_tgz(&members, out, epoch)
        .with_context(|| format!("writing the stemcell image {}", out.display()))
}

/// The stemcell tarball for `spec` at `out`: `stemcell.MF`,
/// `packages.txt`, `dev_tools_file_list.txt`, `image` (the file made by
/// [`image_tarball`]), `sbom.spdx.json` and `sbom.cdx.json`. Written under
/// a temporary name and renamed when complete. Warns when the image has no
/// BOSH agent.
pub fn stemcell(spec: &StemcellSpec, image: &Path, extras: &Extras, out: &Path) -> Result<()> {
    spec.check()?;
    for (what, bytes) in [
        ("SPDX SBOM", extras.sbom_spdx),
        ("CycloneDX SBOM", extras.sbom_cyclonedx),
    ] {
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
            .with_context(|| format!("the {what} for the stemcell is not JSON"))?;
    }
    let sha1 = sha1_file(image)?;
    let manifest = stemcell_mf(spec, &sha1)?;
    if spec.agent.is_none() {
        crate::progress::warn(&format!(
            "no BOSH agent in the image: {} is complete, but a BOSH Director \
             cannot manage the VMs it boots (stemcell.MF says so)",
            spec.file_name()
        ));
    }
    let members = [
        (STEMCELL_MEMBERS[0], Source::Bytes(manifest.as_bytes())),
        (STEMCELL_MEMBERS[1], Source::Bytes(extras.packages_txt)),
        (
            STEMCELL_MEMBERS[2],
            Source::Bytes(extras.dev_tools_file_list),
        ),
        (STEMCELL_MEMBERS[3], Source::File(image)),
        (STEMCELL_MEMBERS[4], Source::Bytes(extras.sbom_spdx)),
        (STEMCELL_MEMBERS[5], Source::Bytes(extras.sbom_cyclonedx)),
    ];
    write_tgz(&members, out, spec.epoch)
        .with_context(|| format!("writing the stemcell {}", out.display()))
}

/// Where a tar member's bytes come from.
enum Source<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

/// Write `members` as a gzip tar at `out` (via a temporary name): regular
/// files, mode 0644, owner root (0:0), mtime `epoch`, GNU headers (a
/// member over 8 GiB gets GNU's binary size field).
fn write_tgz(members: &[(&str, Source)], out: &Path, epoch: i64) -> Result<()> {
    ensure!(epoch >= 0, "member time {epoch} is before 1970");
    let mut seen = HashSet::new();
    for (name, _) in members {
        ensure!(
            !name.is_empty() && !name.contains('/') && *name != "." && *name != "..",
            "tar member name `{name}` must be a plain file name"
        );
        ensure!(seen.insert(*name), "tar member `{name}` appears twice");
    }
    let partial = fsutil::partial_path(out);
    let result = write_tgz_to(members, &partial, epoch as u64);
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result?;
    fsutil::commit(&partial, out)
}

fn write_tgz_to(members: &[(&str, Source)], path: &Path, mtime: u64) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let gz = ParallelGzip::new(BufWriter::with_capacity(1 << 20, file))
        .with_context(|| format!("writing {}", path.display()))?;
    let mut tar = tar::Builder::new(gz);
    for (name, source) in members {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_username("root")?;
        header.set_groupname("root")?;
        header.set_mtime(mtime);
        match source {
            Source::Bytes(bytes) => {
                header.set_size(bytes.len() as u64);
                tar.append_data(&mut header, name, *bytes)
                    .with_context(|| format!("adding {name} to {}", path.display()))?;
            }
            Source::File(src) => append_file(&mut tar, &mut header, name, src)
                .with_context(|| format!("adding {} as {name}", src.display()))?,
        }
    }
    let gz = tar
        .into_inner()
        .with_context(|| format!("finishing the tar stream of {}", path.display()))?;
    let file = gz
        .finish()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .with_context(|| format!("finishing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    header: &mut tar::Header,
    name: &str,
    src: &Path,
) -> Result<()> {
    let file = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let size = file
        .metadata()
        .with_context(|| format!("stat {}", src.display()))?
        .len();
    header.set_size(size);
    let mut body = BufReader::with_capacity(1 << 20, crate::interrupt::Reader(file)).take(size);
    tar.append_data(header, name, &mut body)?;
    ensure!(
        body.limit() == 0,
        "{} shrank while it was being archived",
        src.display()
    );
    Ok(())
}

/// SHA-1 of a file's contents, lowercase hex.
fn sha1_file(path: &Path) -> Result<String> {
    super::manifest::digest_file::<Sha1>(path)
}

/// One command of an upload recipe: what it does, its argument vector
/// (ready for `execve`) and the same as a shell line.
#[derive(Serialize)]
struct Step {
    what: &'static str,
    argv: Vec<String>,
    command: String,
}

impl Step {
    fn new(what: &'static str, argv: Vec<String>) -> Step {
        let command = argv
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        Step {
            what,
            argv,
            command,
        }
    }
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// The words of an upload recipe the user fills in.
const S3_BUCKET: &str = "<s3-bucket>";
const IMPORT_TASK: &str = "<import-task-id>";
const SNAPSHOT: &str = "<snapshot-id>";

/// A word of a recipe to replace, and what goes there.
#[derive(Serialize)]
struct Placeholder {
    word: &'static str,
    meaning: &'static str,
}

#[derive(Serialize)]
struct AwsImport<'a> {
    name: String,
    description: String,
    image_file: &'a str,
    image_format: &'static str,
    architecture: &'static str,
    boot_mode: &'a str,
    ena_support: bool,
    root_device_name: &'static str,
    virtualization_type: &'static str,
    imds_support: &'static str,
    volume_size_gib: u64,
    volume_type: &'static str,
    placeholders: [Placeholder; 3],
    steps: [Step; 4],
}

/// `NAME.aws.json`: what `aws ec2 import-snapshot` and `aws ec2
/// register-image` need to turn the raw disk `raw_file_name` into an AMI
/// with a root volume of `volume_gib` GiB, and the commands themselves
/// (with `<s3-bucket>`, `<import-task-id>` and `<snapshot-id>` to fill in).
pub fn aws_json(spec: &StemcellSpec, raw_file_name: &str, volume_gib: u64) -> Result<Vec<u8>> {
    spec.check()?;
    ensure!(
        volume_gib > 0 && volume_gib * 1024 >= spec.disk_mib,
        "an EBS volume of {volume_gib} GiB cannot hold the {} MiB disk",
        spec.disk_mib
    );
    let name = format!("{}-{}", spec.os_name, spec.version);
    let description = format!("{} {} (stemforge)", spec.os_name, spec.version);
    let container = serde_json::json!({
        "Description": description,
        "Format": "RAW",
        "UserBucket": { "S3Bucket": S3_BUCKET, "S3Key": raw_file_name },
    });
    let mappings = serde_json::json!([{
        "DeviceName": "/dev/xvda",
        "Ebs": {
            "SnapshotId": SNAPSHOT,
            "VolumeSize": volume_gib,
            "VolumeType": "gp3",
            "DeleteOnTermination": true,
        },
    }]);
    let import = AwsImport {
        image_file: raw_file_name,
        image_format: "RAW",
        architecture: "x86_64",
        boot_mode: &spec.boot_mode,
        ena_support: true,
        root_device_name: "/dev/xvda",
        virtualization_type: "hvm",
        imds_support: "v2.0",
        volume_size_gib: volume_gib,
        volume_type: "gp3",
        placeholders: [
            Placeholder {
                word: S3_BUCKET,
                meaning: "an S3 bucket the vmimport service role can read",
            },
            Placeholder {
                word: IMPORT_TASK,
                meaning: "the ImportTaskId that import-snapshot prints",
            },
            Placeholder {
                word: SNAPSHOT,
                meaning: "the SnapshotId of the completed import task",
            },
        ],
        steps: [
            Step::new(
                "upload the raw disk",
                args(&[
                    "aws",
                    "s3",
                    "cp",
                    raw_file_name,
                    &format!("s3://{S3_BUCKET}/{raw_file_name}"),
                ]),
            ),
            Step::new(
                "import it as an EBS snapshot",
                args(&[
                    "aws",
                    "ec2",
                    "import-snapshot",
                    "--description",
                    &description,
                    "--disk-container",
                    &container.to_string(),
                ]),
            ),
            Step::new(
                "wait until the task is completed; it names the snapshot",
                args(&[
                    "aws",
                    "ec2",
                    "describe-import-snapshot-tasks",
                    "--import-task-ids",
                    IMPORT_TASK,
                ]),
            ),
            Step::new(
                "register the AMI",
                args(&[
                    "aws",
                    "ec2",
                    "register-image",
                    "--name",
                    &name,
                    "--description",
                    &description,
                    "--architecture",
                    "x86_64",
                    "--boot-mode",
                    &spec.boot_mode,
                    "--ena-support",
                    "--root-device-name",
                    "/dev/xvda",
                    "--virtualization-type",
                    "hvm",
                    "--imds-support",
                    "v2.0",
                    "--block-device-mappings",
                    &mappings.to_string(),
                ]),
            ),
        ],
        name,
        description,
    };
    pretty_json(&import)
}

#[derive(Serialize)]
struct GlanceImage<'a> {
    name: String,
    file: &'a str,
    disk_format: &'static str,
    container_format: &'static str,
    min_disk_gib: u64,
    properties: GlanceProperties<'a>,
    steps: [Step; 1],
}

#[derive(Serialize)]
struct GlanceProperties<'a> {
    architecture: &'static str,
    os_type: &'static str,
    os_distro: &'a str,
    os_version: &'a str,
    hw_firmware_type: &'static str,
    hw_machine_type: &'static str,
    hw_disk_bus: &'static str,
    hw_vif_model: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    hw_qemu_guest_agent: Option<&'static str>,
}

/// `NAME.openstack.json`: the Glance image for the qcow2 `qcow2_file_name`
/// (`os_distro` and `os_version` from `spec.distro` and
/// `spec.distro_version`; `hw_qemu_guest_agent` only when the image has
/// the QEMU guest agent) and an `openstack image create` command.
pub fn openstack_json(
    spec: &StemcellSpec,
    qcow2_file_name: &str,
    has_guest_agent: bool,
) -> Result<Vec<u8>> {
    spec.check()?;
    let name = format!("{}-{}", spec.os_name, spec.version);
    let properties = GlanceProperties {
        architecture: "x86_64",
        os_type: "linux",
        os_distro: &spec.distro,
        os_version: &spec.distro_version,
        hw_firmware_type: "uefi",
        hw_machine_type: "q35",
        hw_disk_bus: "virtio",
        hw_vif_model: "virtio",
        hw_qemu_guest_agent: has_guest_agent.then_some("yes"),
    };
    let min_disk_gib = spec.disk_mib.div_ceil(1024);
    let mut argv = args(&[
        "openstack",
        "image",
        "create",
        "--disk-format",
        "qcow2",
        "--container-format",
        "bare",
        "--file",
        qcow2_file_name,
        "--min-disk",
        &min_disk_gib.to_string(),
    ]);
    let props = serde_json::to_value(&properties).context("listing the Glance properties")?;
    for (key, value) in props.as_object().into_iter().flatten() {
        let value = value
            .as_str()
            .context("a Glance property that is not text")?;
        argv.extend(["--property".to_string(), format!("{key}={value}")]);
    }
    argv.push(name.clone());
    pretty_json(&GlanceImage {
        name,
        file: qcow2_file_name,
        disk_format: "qcow2",
        container_format: "bare",
        min_disk_gib,
        properties,
        steps: [Step::new("create the Glance image", argv)],
    })
}

fn pretty_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value).context("writing JSON")?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// A gzip writer that deflates on every core (see the module docs). Call
/// [`ParallelGzip::finish`] to write the trailer.
struct ParallelGzip<W: Write> {
    out: W,
    chunk: Vec<u8>,
    /// A chunk of zeros, to recognise the holes of a sparse disk.
    zeros: Vec<u8>,
    /// The deflated form of `zeros`, made the first time it is needed.
    zero_chunk: Option<Deflated>,
    pending: std::collections::VecDeque<Pending>,
    max_pending: usize,
    crc: flate2::Crc,
}

const CHUNK: usize = 4 << 20;
/// Samples taken from a chunk to decide whether deflating it pays.
const PROBES: usize = 4;
const PROBE_LEN: usize = 64 << 10;

struct Deflated {
    bytes: Vec<u8>,
    crc: flate2::Crc,
}

enum Pending {
    Zeros,
    Busy(std::thread::JoinHandle<std::io::Result<Deflated>>),
}

impl<W: Write> ParallelGzip<W> {
    fn new(mut out: W) -> std::io::Result<Self> {
        // Magic, deflate, no flags, no timestamp, no extra flags, Unix.
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(ParallelGzip {
            out,
            chunk: Vec::with_capacity(CHUNK),
            zeros: vec![0u8; CHUNK],
            zero_chunk: None,
            pending: Default::default(),
            max_pending: cores * 2,
            crc: flate2::Crc::new(),
        })
    }

    /// Hand the full (or last) chunk to a compressing thread.
    fn dispatch(&mut self) -> std::io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        while self.pending.len() >= self.max_pending {
            self.retire_oldest()?;
        }
        if self.chunk == self.zeros {
            if self.zero_chunk.is_none() {
                self.zero_chunk = Some(deflate_chunk(&self.chunk)?);
            }
            self.chunk.clear();
            self.pending.push_back(Pending::Zeros);
            return Ok(());
        }
        let data = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
        let job = std::thread::spawn(move || deflate_chunk(&data));
        self.pending.push_back(Pending::Busy(job));
        Ok(())
    }

    /// Write the oldest chunk's deflated bytes, waiting for them if needed.
    fn retire_oldest(&mut self) -> std::io::Result<()> {
        let done = match self.pending.pop_front() {
            None => return Ok(()),
            Some(Pending::Zeros) => None,
            Some(Pending::Busy(job)) => Some(
                job.join()
                    .map_err(|_| std::io::Error::other("a compressing thread panicked"))??,
            ),
        };
        let d = done
            .as_ref()
            .or(self.zero_chunk.as_ref())
            .expect("the zero chunk is deflated before it is queued");
        self.out.write_all(&d.bytes)?;
        self.crc.combine(&d.crc);
        Ok(())
    }

    /// Write everything still pending, the final block and the trailer
    /// (CRC-32 and length modulo 2^32); returns the inner writer, flushed.
    fn finish(mut self) -> std::io::Result<W> {
        self.dispatch()?;
        while !self.pending.is_empty() {
            self.retire_oldest()?;
        }
        let mut last = Vec::with_capacity(16);
        flate2::Compress::new(flate2::Compression::default(), false)
            .compress_vec(&[], &mut last, flate2::FlushCompress::Finish)
            .map_err(std::io::Error::other)?;
        self.out.write_all(&last)?;
        self.out.write_all(&self.crc.sum().to_le_bytes())?;
        self.out.write_all(&self.crc.amount().to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&data[..n]);
        if self.chunk.len() == CHUNK {
            self.dispatch()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Deflate one chunk as raw deflate blocks ending on a byte boundary (a
/// sync flush, not final), so chunks concatenate into one stream. A chunk
/// none of whose samples shrinks by 1/32 at the fastest level is stored.
fn deflate_chunk(data: &[u8]) -> std::io::Result<Deflated> {
    use flate2::Compression;
    let step = (data.len() / PROBES).max(1);
    let mut compressible = false;
    for start in (0..data.len()).step_by(step).take(PROBES) {
        let sample = &data[start..data.len().min(start + PROBE_LEN)];
        let packed = deflate(sample, Compression::fast())?;
        if packed.len() < sample.len() - sample.len() / 32 {
            compressible = true;
            break;
        }
    }
    let level = if compressible {
        Compression::default()
    } else {
        Compression::none()
    };
    let mut crc = flate2::Crc::new();
    crc.update(data);
    Ok(Deflated {
        bytes: deflate(data, level)?,
        crc,
    })
}

fn deflate(data: &[u8], level: flate2::Compression) -> std::io::Result<Vec<u8>> {
    use flate2::{Compress, FlushCompress};
    let mut z = Compress::new(level, false);
    let mut out = Vec::with_capacity(data.len() / 2 + 4096);
    loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(data.len() / 4 + 4096);
        }
        let done = z.total_in() as usize;
        z.compress_vec(&data[done..], &mut out, FlushCompress::Sync)
            .map_err(std::io::Error::other)?;
        // The flush is complete once all input is taken and the output
        // buffer was not filled to the brim.
        if z.total_in() as usize == data.len() && out.len() < out.capacity() {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn spec(iaas: Iaas) -> StemcellSpec {
        StemcellSpec {
            iaas,
            version: "1.5".into(),
            os_name: "debian-bookworm".into(),
            distro: "debian".into(),
            distro_version: "12".into(),
            disk_mib: 5120,
            boot_mode: "uefi".into(),
            agent: None,
            epoch: 1_700_000_000,
        }
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn pargz(data: &[u8], writes: usize) -> Vec<u8> {
        let mut gz = ParallelGzip::new(Vec::new()).unwrap();
        for part in data.chunks(writes.max(1)) {
            gz.write_all(part).unwrap();
        }
        gz.finish().unwrap()
    }

    /// Bytes deflate cannot shrink: SHA-256 in counter mode.
    fn noise(len: usize) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut out = Vec::with_capacity(len + 32);
        let mut i = 0u64;
        while out.len() < len {
            out.extend_from_slice(&Sha256::digest(i.to_le_bytes()));
            i += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn parallel_gzip_round_trips_text_zeros_and_noise() {
        // Real text (this file) over two chunks, a long run of zeros, a
        // chunk deflate cannot shrink, and a ragged last chunk.
        let text = include_bytes!("bosh.rs");
        let mut data = Vec::new();
        while data.len() < 2 * CHUNK {
            data.extend_from_slice(text);
        }
        data.extend(std::iter::repeat_n(0u8, 3 * CHUNK + 17));
        data.extend_from_slice(&noise(CHUNK + 5));
        data.extend_from_slice(&text[..1000]);
        let gz = pargz(&data, 65536 + 3);
        assert_eq!(gunzip(&gz), data);
        assert!(gz.len() < data.len() / 2, "{} of {}", gz.len(), data.len());
        // The same input gives the same bytes however it is written.
        assert_eq!(pargz(&data, 511), gz);
    }

    #[test]
    fn parallel_gzip_of_nothing_is_an_empty_gzip() {
        let gz = pargz(&[], 1);
        assert_eq!(&gz[..3], &[0x1f, 0x8b, 8]);
        assert!(gunzip(&gz).is_empty());
    }

    #[test]
    fn incompressible_chunks_are_stored() {
        let random = noise(CHUNK);
        let d = deflate_chunk(&random).unwrap();
        // Stored blocks: 5 bytes of header per 64 KiB at most.
        assert!(d.bytes.len() >= random.len(), "{}", d.bytes.len());
        assert!(d.bytes.len() < random.len() + random.len() / 1000 + 64);
        let text = include_bytes!("bosh.rs");
        let t = deflate_chunk(text).unwrap();
        assert!(t.bytes.len() < text.len() / 2);
    }

    #[test]
    fn bad_iaas_names_the_flag_and_the_valid_names() {
        assert_eq!(Iaas::parse("--iaas", "vsphere").unwrap(), Iaas::Vsphere);
        let e = Iaas::parse("--iaas", "gce").unwrap_err();
        let msg = e.to_string();
        for word in ["--iaas", "gce", "aws", "vsphere", "openstack"] {
            assert!(msg.contains(word), "{word} missing from {msg}");
        }
    }

    #[test]
    fn names_follow_bosh() {
        let s = spec(Iaas::Aws);
        assert_eq!(s.name(), "bosh-aws-xen-hvm-debian-bookworm-go_agent");
        assert_eq!(
            s.file_name(),
            "bosh-stemcell-1.5-aws-xen-hvm-debian-bookworm-go_agent.tgz"
        );
        assert_eq!(
            spec(Iaas::Vsphere).name(),
            "bosh-vsphere-esxi-debian-bookworm-go_agent"
        );
        assert_eq!(
            spec(Iaas::Openstack).name(),
            "bosh-openstack-kvm-debian-bookworm-go_agent"
        );
    }

    #[test]
    fn yaml_1_1_lookalikes_are_quoted() {
        // serde_yaml leaves these plain; YAML 1.1 readers (yaml.v2, Psych)
        // would not read them as strings.
        let plain = serde_yaml::to_string(&["yes", "on", "1:20"]).unwrap();
        assert!(plain.contains("- yes"), "{plain}");
        let text = quoted_yaml(&serde_json::json!({
            "a": "yes", "b": "on", "c": "1:20", "d": "0.1.0", "n": 3, "t": true,
            "e": "with \"quotes\" and \\ and ünïcode",
        }))
        .unwrap();
        for line in [
            "a: \"yes\"",
            "b: \"on\"",
            "c: \"1:20\"",
            "d: \"0.1.0\"",
            "n: 3",
            "t: true",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(text.starts_with("---"), "{text}");
    }

    #[test]
    fn manifest_refuses_a_bad_sha1_and_bad_names() {
        let s = spec(Iaas::Aws);
        assert!(stemcell_mf(&s, "abc").is_err());
        assert!(stemcell_mf(&s, &"A".repeat(40)).is_err());
        let mut bad = spec(Iaas::Aws);
        bad.version = "1 2".into();
        let e = stemcell_mf(&bad, &"a".repeat(40)).unwrap_err();
        assert!(e.to_string().contains("version"), "{e}");
        let mut bad = spec(Iaas::Aws);
        bad.boot_mode = "legacy-bios".into();
        assert!(stemcell_mf(&bad, &"a".repeat(40)).is_err());
    }
}
