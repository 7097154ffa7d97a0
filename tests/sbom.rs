//! SBOMs of this host's whole dpkg database (a few hundred real packages),
//! checked against dpkg itself and against the formats' own validators:
//! `pyspdxtools` for SPDX 2.3 and the official CycloneDX 1.6 JSON schema.

mod common;

use common::validate::{check_cyclonedx, check_spdx};
use serde_json::Value;
use std::path::Path;
use std::time::Instant;
use stemforge::exec::cmd;
use stemforge::formats::sbom::{self, Package, SbomMeta};

/// This host's distribution, from its os-release.
fn host_meta() -> SbomMeta {
    let text = std::fs::read_to_string("/etc/os-release").unwrap();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .trim_matches('"')
            .to_string()
    };
    SbomMeta {
        name: "host".into(),
        version: "0.0.1".into(),
        distro: field("ID"),
        distro_version: field("VERSION_ID"),
        codename: field("VERSION_CODENAME"),
        created: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        tool_version: stemforge::VERSION.into(),
        namespace_seed: "host-test".into(),
    }
}

/// This host's packages, with .deb checksums from any plain `*_Packages`
/// index apt keeps (hosts that compress their indexes have none).
fn host_packages() -> Vec<Package> {
    let t0 = Instant::now();
    let lists = Path::new("/var/lib/apt/lists");
    let pkgs = sbom::read_packages(Path::new("/"), Some(lists)).unwrap();
    eprintln!("read {} packages in {:?}", pkgs.len(), t0.elapsed());
    assert!(pkgs.len() > 100, "only {} packages", pkgs.len());
    pkgs
}

#[test]
fn host_packages_txt_is_what_dpkg_l_prints() {
    // A snapshot of the database, so a concurrent apt run cannot race.
    let snap = tempfile::tempdir().unwrap();
    let admin = snap.path().join("var/lib/dpkg");
    std::fs::create_dir_all(admin.join("updates")).unwrap();
    std::fs::copy("/var/lib/dpkg/status", admin.join("status")).unwrap();
    let dpkg = cmd("dpkg-query", ["-l"])
        .arg(format!("--admindir={}", admin.display()))
        .clear_env()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .read()
        .expect("dpkg-query (a Debian host) lists the database");
    // Only installed packages are listed (dpkg -l adds config-files ones).
    let installed: String = dpkg
        .lines()
        .filter(|l| !l.starts_with(|c: char| c.is_ascii_lowercase()) || l.get(1..2) == Some("i"))
        .map(|l| format!("{l}\n"))
        .collect();
    let pkgs = sbom::read_packages(snap.path(), None).unwrap();
    assert!(pkgs.len() > 100, "only {} packages", pkgs.len());
    let ours = sbom::packages_txt(&pkgs);
    for (n, (a, b)) in ours.lines().zip(installed.lines()).enumerate() {
        assert_eq!(a, b, "line {}", n + 1);
    }
    assert_eq!(ours, installed);
}

#[test]
fn host_sboms_describe_every_installed_package() {
    let pkgs = host_packages();
    let meta = host_meta();
    let t0 = Instant::now();
    let spdx: Value = serde_json::from_slice(&sbom::spdx_json(&pkgs, &meta).unwrap()).unwrap();
    let cdx: Value = serde_json::from_slice(&sbom::cyclonedx_json(&pkgs, &meta).unwrap()).unwrap();
    eprintln!("wrote both SBOMs in {:?}", t0.elapsed());
    let components = cdx["components"].as_array().unwrap();
    assert_eq!(components.len(), pkgs.len());
    let contains = spdx["relationships"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["relationshipType"] == "CONTAINS")
        .count();
    assert_eq!(contains, pkgs.len());
    // Every installed package of dpkg's own list is there, by purl.
    let listed = cmd(
        "dpkg-query",
        [
            "-W",
            "-f",
            "${Package} ${Version} ${Architecture} ${db:Status-Status}\n",
        ],
    )
    .read()
    .unwrap();
    let purls: std::collections::BTreeSet<&str> = components
        .iter()
        .map(|c| c["purl"].as_str().unwrap())
        .collect();
    let mut checked = 0;
    for line in listed.lines().filter(|l| l.ends_with(" installed")) {
        let w: Vec<&str> = line.split(' ').collect();
        let p = pkgs
            .iter()
            .find(|p| p.name == w[0] && p.architecture == w[2]);
        let p = p.unwrap_or_else(|| panic!("{line} is missing"));
        assert_eq!(p.version, w[1]);
        assert!(purls.contains(sbom::purl(p, &meta).as_str()));
        checked += 1;
    }
    assert!(checked > 100);
    // The copyright files of a Debian host name licences for most packages.
    let with_licences = pkgs.iter().filter(|p| !p.licenses.is_empty()).count();
    assert!(
        with_licences * 2 > pkgs.len(),
        "{with_licences} of {}",
        pkgs.len()
    );
}

#[test]
#[ignore = "needs the validators `make deps` installs (target/validators)"]
fn host_spdx_passes_pyspdxtools() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("host.spdx.json");
    std::fs::write(
        &file,
        sbom::spdx_json(&host_packages(), &host_meta()).unwrap(),
    )
    .unwrap();
    check_spdx(&file).unwrap();
}

#[test]
#[ignore = "needs the validators `make deps` installs (target/validators)"]
fn host_cyclonedx_passes_the_official_schema() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("host.cdx.json");
    std::fs::write(
        &file,
        sbom::cyclonedx_json(&host_packages(), &host_meta()).unwrap(),
    )
    .unwrap();
    check_cyclonedx(&file).unwrap();
}

/// The checks above can fail: each validator rejects a document broken
/// in one place.
#[test]
#[ignore = "needs the validators `make deps` installs (target/validators)"]
fn validators_reject_broken_documents() {
    let pkgs = host_packages();
    let meta = host_meta();
    let dir = tempfile::tempdir().unwrap();

    let mut spdx: Value = serde_json::from_slice(&sbom::spdx_json(&pkgs, &meta).unwrap()).unwrap();
    let file = dir.path().join("broken.spdx.json");
    // A LicenseRef used by packages but no longer defined.
    let removed = spdx
        .as_object_mut()
        .unwrap()
        .remove("hasExtractedLicensingInfos");
    assert!(removed.is_some(), "the host's SBOM has LicenseRefs");
    std::fs::write(&file, serde_json::to_vec(&spdx).unwrap()).unwrap();
    let err = check_spdx(&file).unwrap_err();
    assert!(format!("{err:#}").contains("LicenseRef"), "{err:#}");

    let mut cdx: Value =
        serde_json::from_slice(&sbom::cyclonedx_json(&pkgs, &meta).unwrap()).unwrap();
    let file = dir.path().join("broken.cdx.json");
    // A licence id that is not on the SPDX list.
    cdx["components"][0]["licenses"] = serde_json::json!([{"license": {"id": "GPL-2+"}}]);
    std::fs::write(&file, serde_json::to_vec(&cdx).unwrap()).unwrap();
    let err = check_cyclonedx(&file).unwrap_err();
    assert!(
        format!("{err:#}").contains("components/0/licenses"),
        "{err:#}"
    );
}
