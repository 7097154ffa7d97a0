//! The k8s-node role's live proof, in the booted image.

use super::{Proof, run};
use std::path::Path;

/// The k8s-node role: the kubelet runs when the build was given one; an
/// image built without it says which live checks could not run.
pub fn prove() -> Proof {
    let mut p = Proof::new(
        "k8s-node",
        "the kubelet runs with the hardened configuration",
    );
    let bin = "/usr/local/bin/kubelet";
    if !Path::new(bin).exists() {
        p.passed = false;
        p.skipped = Some(format!(
            "{bin} is not installed (built without `--role-input kubelet=FILE`): the kubelet's service, its serving port and its live configuration were not checked; the configuration file, unit, directories, modes, modules and sysctls were"
        ));
        return p;
    }
    let v = run(bin, &["--version"]);
    p.step(v.is_ok(), format!("{bin} --version: {v:?}"));
    let active = run("systemctl", &["is-active", "kubelet"]);
    p.step(
        active.as_deref() == Ok("active"),
        format!("kubelet.service: {active:?}"),
    );
    p
}
