//! `yaml`: values at key paths of a YAML file (a kubelet configuration).
//! The same offline and live: the service reads the file. A file that
//! does not parse, or holds more than one document, fails the check.

use crate::scan::keypath::Document;

pub type YamlCheck = Document<true>;

pub fn parse(text: &str) -> Result<serde_json::Value, String> {
    serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        format!("{at}: not valid YAML: {e}")
    })
}

crate::register_kind!("yaml", YamlCheck);

#[cfg(test)]
mod tests {
    use crate::scan::check::parse_check;
    use crate::scan::outcome::Status;
    use crate::scan::target::Target;
    use std::fs;

    #[test]
    fn keys_of_a_kubelet_configuration() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("var/lib/kubelet")).unwrap();
        let file = d.path().join("var/lib/kubelet/config.yaml");
        fs::write(
            &file,
            "kind: KubeletConfiguration\nauthentication:\n  anonymous:\n    enabled: false\nreadOnlyPort: 0\ntlsCipherSuites: [TLS_AES_128_GCM_SHA256]\n",
        )
        .unwrap();
        let c = parse_check(
            "yaml: { path: /var/lib/kubelet/config.yaml, keys: { authentication.anonymous.enabled: false, readOnlyPort: 0, tlsCipherSuites: { subset_of: [TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384] } } }",
        )
        .unwrap();
        let t = Target::root(d.path()).unwrap();
        assert_eq!(c.eval(&t).status, Status::Pass, "{:?}", c.eval(&t));
        fs::write(
            &file,
            "authentication: {anonymous: {enabled: true}}\nreadOnlyPort: 0\n",
        )
        .unwrap();
        assert_eq!(c.eval(&t).status, Status::Fail);
        fs::write(&file, "a: [\n").unwrap();
        let o = c.eval(&t);
        assert_eq!(o.status, Status::Fail);
        assert!(o.evidence[0].contains("not valid YAML"), "{o:?}");
    }
}
