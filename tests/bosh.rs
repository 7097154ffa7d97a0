//! BOSH stemcells built from a small real disk for every IaaS and read back
//! with the system's own tar and gzip, and the EC2 and Glance upload
//! metadata.

mod common;

use serde_yaml::Value;
use sha1::{Digest, Sha1};
use std::path::{Path, PathBuf};
use stemforge::exec::cmd;
use stemforge::formats::bosh::{self, Extras, Iaas, STEMCELL_MEMBERS, StemcellSpec};

const EPOCH: i64 = 1_700_000_000;

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bosh")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn spec(iaas: Iaas, version: &str, agent: Option<&str>) -> StemcellSpec {
    StemcellSpec {
        iaas,
        version: version.into(),
        os_name: "debian-bookworm".into(),
        distro: "debian".into(),
        distro_version: "12".into(),
        disk_mib: 64,
        boot_mode: "uefi".into(),
        agent: agent.map(String::from),
        epoch: EPOCH,
    }
}

/// A host tool, also where PATH lacks the sbin directories.
fn tool(name: &str) -> PathBuf {
    stemforge::exec::which(name)
        .or_else(|| Some(Path::new("/usr/sbin").join(name)).filter(|p| p.exists()))
        .unwrap_or_else(|| panic!("{name} is missing: run `make deps`"))
}

/// A 64 MiB raw disk holding an ext4 file system with real files (this
/// repository's sources) and free space.
fn real_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("disk.raw");
    cmd(tool("qemu-img"), ["create", "-q", "-f", "raw"])
        .arg(&disk)
        .arg("64M")
        .run()
        .unwrap();
    cmd(tool("mkfs.ext4"), ["-q", "-F", "-b", "4096", "-d"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
        .arg(&disk)
        .run()
        .unwrap();
    disk
}

fn sha1_hex(bytes: &[u8]) -> String {
    hex::encode(Sha1::digest(bytes))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The files of `iaas`'s inner image, made from `disk` the way the other
/// formats make them, under the names BOSH's builder uses.
fn image_members(iaas: Iaas, dir: &Path, disk: &Path) -> Vec<(String, PathBuf)> {
    let qemu_img = tool("qemu-img");
    match iaas {
        Iaas::Aws => vec![("root.img".into(), disk.to_path_buf())],
        Iaas::Openstack => {
            let qcow2 = dir.join("disk.qcow2");
            cmd(
                &qemu_img,
                ["convert", "-q", "-f", "raw", "-O", "qcow2", "-c"],
            )
            .arg(disk)
            .arg(&qcow2)
            .run()
            .unwrap();
            vec![("root.img".into(), qcow2)]
        }
        Iaas::Vsphere => {
            let vmdk = dir.join("image-disk1.vmdk");
            cmd(&qemu_img, ["convert", "-q", "-f", "raw", "-O", "vmdk"])
                .args(["-o", "subformat=streamOptimized"])
                .arg(disk)
                .arg(&vmdk)
                .run()
                .unwrap();
            let ovf = dir.join("image.ovf");
            std::fs::write(&ovf, fixture("image.ovf")).unwrap();
            let mf = dir.join("image.mf");
            let mut lines = String::new();
            for p in [&ovf, &vmdk] {
                let name = p.file_name().unwrap().to_string_lossy();
                let digest = sha256_hex(&std::fs::read(p).unwrap());
                lines.push_str(&format!("SHA256({name})= {digest}\n"));
            }
            std::fs::write(&mf, lines).unwrap();
            vec![
                ("image.ovf".into(), ovf),
                ("image.mf".into(), mf),
                ("image-disk1.vmdk".into(), vmdk),
            ]
        }
    }
}

struct Built {
    image: PathBuf,
    stemcell: PathBuf,
}

/// The files a stemcell carries next to its image, from the fixtures.
struct ExtraFiles([Vec<u8>; 4]);

impl ExtraFiles {
    fn load() -> ExtraFiles {
        ExtraFiles(
            [
                "packages.txt",
                "dev_tools_file_list.txt",
                "sbom.spdx.json",
                "sbom.cdx.json",
            ]
            .map(fixture),
        )
    }

    fn extras(&self) -> Extras<'_> {
        Extras {
            packages_txt: &self.0[0],
            dev_tools_file_list: &self.0[1],
            sbom_spdx: &self.0[2],
            sbom_cyclonedx: &self.0[3],
        }
    }
}

fn build(spec: &StemcellSpec, members: &[(String, PathBuf)], dir: &Path, tag: &str) -> Built {
    let files = ExtraFiles::load();
    let refs: Vec<(&str, &Path)> = members
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    let image = dir.join(format!("image-{tag}"));
    bosh::image_tarball(&refs, &image, spec.epoch).unwrap();
    let out_dir = dir.join(format!("out-{tag}"));
    std::fs::create_dir_all(&out_dir).unwrap();
    let stemcell = out_dir.join(spec.file_name());
    bosh::stemcell(spec, &image, &files.extras(), &stemcell).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    Built { image, stemcell }
}

/// The member names of a gzip tar, as the system's tar lists them.
fn tar_list(archive: &Path) -> Vec<String> {
    cmd("tar", ["-tzf"])
        .arg(archive)
        .read()
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn tar_extract(archive: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    cmd("tar", ["-xzf"])
        .arg(archive)
        .arg("-C")
        .arg(into)
        .run()
        .unwrap();
}

/// The value of a top-level (or cloud_properties) line `key: value` of
/// the manifest's text, exactly as written.
fn raw_value<'a>(text: &'a str, indent: &str, key: &str) -> &'a str {
    let prefix = format!("{indent}{key}: ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no `{prefix}` line in\n{text}"))
}

fn is_double_quoted(raw: &str) -> bool {
    raw.len() >= 2 && raw.starts_with('"') && raw.ends_with('"')
}

fn check_stemcell(iaas: Iaas, spec: &StemcellSpec, built: &Built, members: &[(String, PathBuf)]) {
    assert_eq!(tar_list(&built.stemcell), STEMCELL_MEMBERS, "{iaas:?}");
    cmd("gzip", ["-t"]).arg(&built.stemcell).run().unwrap();
    let x = built.stemcell.with_extension("x");
    tar_extract(&built.stemcell, &x);
    for (member, fixture_name) in [
        ("packages.txt", "packages.txt"),
        ("dev_tools_file_list.txt", "dev_tools_file_list.txt"),
        ("sbom.spdx.json", "sbom.spdx.json"),
        ("sbom.cdx.json", "sbom.cdx.json"),
    ] {
        assert_eq!(
            std::fs::read(x.join(member)).unwrap(),
            fixture(fixture_name),
            "{member}"
        );
    }

    // stemcell.MF: the text as written, then as a YAML parser reads it.
    let text = std::fs::read_to_string(x.join("stemcell.MF")).unwrap();
    println!("{iaas:?} stemcell.MF:\n{text}");
    for key in ["name", "version", "operating_system", "sha1"] {
        let raw = raw_value(&text, "", key);
        assert!(is_double_quoted(raw), "{key}: {raw} is not quoted");
    }
    assert_eq!(raw_value(&text, "", "api_version"), "3");
    assert_eq!(raw_value(&text, "", "bosh_protocol"), "1");
    for key in [
        "infrastructure",
        "hypervisor",
        "architecture",
        "root_device_name",
    ] {
        assert!(is_double_quoted(raw_value(&text, "  ", key)), "{key}");
    }
    let mf: Value = serde_yaml::from_str(&text).unwrap();
    let s = |v: &Value| {
        v.as_str()
            .unwrap_or_else(|| panic!("{v:?} is not a string"))
            .to_string()
    };
    assert_eq!(s(&mf["name"]), spec.name());
    assert_eq!(s(&mf["version"]), spec.version);
    assert_eq!(s(&mf["operating_system"]), "debian-bookworm");
    assert_eq!(mf["api_version"].as_u64(), Some(3));
    let formats: Vec<String> = mf["stemcell_formats"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    assert_eq!(formats, [iaas.stemcell_format()]);

    // sha1 is the SHA-1 of the image member, recomputed here.
    let image_bytes = std::fs::read(x.join("image")).unwrap();
    assert_eq!(s(&mf["sha1"]), sha1_hex(&image_bytes));
    assert_eq!(image_bytes, std::fs::read(&built.image).unwrap());

    let cp = &mf["cloud_properties"];
    assert_eq!(s(&cp["infrastructure"]), iaas.infrastructure());
    assert_eq!(s(&cp["hypervisor"]), iaas.hypervisor());
    assert_eq!(s(&cp["architecture"]), "x86_64");
    assert_eq!(s(&cp["root_device_name"]), iaas.root_device_name());
    assert_eq!(s(&cp["disk_format"]), iaas.disk_format());
    assert_eq!(s(&cp["container_format"]), "bare");
    assert_eq!(s(&cp["os_distro"]), "debian");
    assert_eq!(cp["disk"].as_u64(), Some(64));
    match iaas {
        Iaas::Aws => {
            assert_eq!(s(&cp["boot_mode"]), "uefi");
            assert_eq!(s(&cp["virtualization_type"]), "hvm");
        }
        Iaas::Openstack => {
            assert_eq!(s(&cp["hw_firmware_type"]), "uefi");
            assert_eq!(cp["auto_disk_config"].as_bool(), Some(true));
        }
        Iaas::Vsphere => assert!(cp.get("boot_mode").is_none()),
    }
    let agent = &mf["bosh_agent"];
    assert_eq!(agent["installed"].as_bool(), Some(spec.agent.is_some()));
    assert_eq!(agent.get("version").map(s), spec.agent.clone());

    // The inner image: the given files, under the given names, unchanged.
    let names: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(tar_list(&x.join("image")), names);
    let y = x.join("image.x");
    tar_extract(&x.join("image"), &y);
    for (name, source) in members {
        let got = std::fs::read(y.join(name)).unwrap();
        assert!(got == std::fs::read(source).unwrap(), "{name} differs");
    }
}

fn stemcell_for(iaas: Iaas, version: &str, agent: Option<&str>) {
    let dir = common::scratch(&format!("bosh-{}", iaas.infrastructure()));
    let disk = real_disk(&dir);
    let members = image_members(iaas, &dir, &disk);
    let spec = spec(iaas, version, agent);
    let first = build(&spec, &members, &dir, "1");
    check_stemcell(iaas, &spec, &first, &members);
    // Deterministic: a second build is byte for byte the same.
    let second = build(&spec, &members, &dir, "2");
    assert!(std::fs::read(&first.image).unwrap() == std::fs::read(&second.image).unwrap());
    assert!(
        std::fs::read(&first.stemcell).unwrap() == std::fs::read(&second.stemcell).unwrap(),
        "two builds of the {iaas:?} stemcell differ"
    );
}

#[test]
fn aws_stemcell_without_an_agent() {
    stemcell_for(Iaas::Aws, "1.5", None);
}

#[test]
fn vsphere_stemcell() {
    stemcell_for(Iaas::Vsphere, "0.1.0", None);
}

#[test]
fn openstack_stemcell_with_an_agent() {
    stemcell_for(Iaas::Openstack, "1234", Some("2.700.0"));
}

#[test]
fn a_bad_iaas_is_a_config_error_naming_the_valid_ones() {
    let e = Iaas::parse("--iaas", "gcp").unwrap_err();
    assert_eq!(e.file, PathBuf::from("--iaas"));
    for word in ["gcp", "aws", "vsphere", "openstack"] {
        assert!(e.message.contains(word), "{word} not in {}", e.message);
    }
    // The command-line names are the same names.
    use clap::ValueEnum;
    for iaas in Iaas::value_variants() {
        let name = iaas.to_possible_value().unwrap().get_name().to_string();
        assert_eq!(Iaas::parse("--iaas", &name).unwrap(), *iaas);
    }
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The argument after `flag` in `argv`.
fn after<'a>(argv: &'a [serde_json::Value], flag: &str) -> &'a str {
    let i = argv
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} missing from {argv:?}"));
    argv[i + 1].as_str().unwrap()
}

/// Each step's shell line splits back into its argument vector.
fn check_steps(doc: &serde_json::Value) {
    for step in doc["steps"].as_array().unwrap() {
        let argv: Vec<String> = step["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let split = shlex::split(step["command"].as_str().unwrap()).unwrap();
        assert_eq!(split, argv);
    }
}

#[test]
fn aws_json_has_what_import_and_register_need() {
    let mut spec = spec(Iaas::Aws, "1.5", None);
    spec.disk_mib = 5120;
    let bytes = bosh::aws_json(&spec, "debian-bookworm.raw", 5).unwrap();
    println!("{}", String::from_utf8_lossy(&bytes));
    let doc = json(&bytes);
    assert_eq!(doc["architecture"], "x86_64");
    assert_eq!(doc["boot_mode"], "uefi");
    assert_eq!(doc["ena_support"], true);
    assert_eq!(doc["root_device_name"], "/dev/xvda");
    assert_eq!(doc["virtualization_type"], "hvm");
    assert_eq!(doc["imds_support"], "v2.0");
    assert_eq!(doc["volume_size_gib"], 5);
    check_steps(&doc);
    let steps = doc["steps"].as_array().unwrap();
    let argv = |i: usize| steps[i]["argv"].as_array().unwrap().clone();
    let import = argv(1);
    assert_eq!(import[2], "import-snapshot");
    let container = json(after(&import, "--disk-container").as_bytes());
    assert_eq!(container["Format"], "RAW");
    assert_eq!(container["UserBucket"]["S3Key"], "debian-bookworm.raw");
    let register = argv(3);
    assert_eq!(register[2], "register-image");
    assert_eq!(after(&register, "--architecture"), "x86_64");
    assert_eq!(after(&register, "--boot-mode"), "uefi");
    assert_eq!(after(&register, "--root-device-name"), "/dev/xvda");
    assert_eq!(after(&register, "--imds-support"), "v2.0");
    assert_eq!(after(&register, "--virtualization-type"), "hvm");
    assert!(register.iter().any(|a| a == "--ena-support"));
    let mappings = json(after(&register, "--block-device-mappings").as_bytes());
    assert_eq!(mappings[0]["DeviceName"], "/dev/xvda");
    assert_eq!(mappings[0]["Ebs"]["VolumeSize"], 5);

    spec.boot_mode = "uefi-preferred".into();
    let doc = json(&bosh::aws_json(&spec, "x.raw", 8).unwrap());
    assert_eq!(doc["boot_mode"], "uefi-preferred");
    let e = bosh::aws_json(&spec, "x.raw", 4).unwrap_err();
    assert!(e.to_string().contains("4 GiB"), "{e}");
}

#[test]
fn openstack_json_has_the_glance_properties() {
    let mut spec = spec(Iaas::Openstack, "1.5", None);
    spec.disk_mib = 5120;
    let bytes = bosh::openstack_json(&spec, "debian-bookworm.qcow2", false).unwrap();
    println!("{}", String::from_utf8_lossy(&bytes));
    let doc = json(&bytes);
    assert_eq!(doc["disk_format"], "qcow2");
    assert_eq!(doc["container_format"], "bare");
    assert_eq!(doc["min_disk_gib"], 5);
    let p = &doc["properties"];
    for (key, value) in [
        ("hw_firmware_type", "uefi"),
        ("hw_machine_type", "q35"),
        ("hw_disk_bus", "virtio"),
        ("hw_vif_model", "virtio"),
        ("os_distro", "debian"),
        ("os_version", "12"),
        ("architecture", "x86_64"),
    ] {
        assert_eq!(p[key], value, "{key}");
    }
    assert!(p.get("hw_qemu_guest_agent").is_none());
    check_steps(&doc);
    let argv = doc["steps"][0]["argv"].as_array().unwrap();
    assert!(argv.iter().any(|a| a == "hw_firmware_type=uefi"));
    assert_eq!(after(argv, "--file"), "debian-bookworm.qcow2");

    let doc = json(&bosh::openstack_json(&spec, "x.qcow2", true).unwrap());
    assert_eq!(doc["properties"]["hw_qemu_guest_agent"], "yes");
}
