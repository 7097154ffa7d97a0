//! `json`: values at key paths of a JSON file (`/etc/docker/daemon.json`).
//! The same offline and live: the daemon reads the file. A file that
//! does not parse fails the check with the parser's line and column,
//! since the daemon refuses to start on it.

use crate::scan::keypath::Document;

pub type JsonCheck = Document<false>;

pub fn parse(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text)
        .map_err(|e| format!(":{}:{}: not valid JSON: {e}", e.line(), e.column()))
}

crate::register_kind!("json", JsonCheck);

#[cfg(test)]
mod tests {
    use crate::scan::check::parse_check;
    use crate::scan::outcome::Status;
    use crate::scan::target::Target;
    use std::fs;

    #[test]
    fn keys_of_a_json_file() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc/docker")).unwrap();
        let file = d.path().join("etc/docker/daemon.json");
        fs::write(
            &file,
            r#"{"icc": false, "log-opts": {"tag": "{{.Name}}"}, "insecure-registries": []}"#,
        )
        .unwrap();
        let c = parse_check(
            "json: { path: /etc/docker/daemon.json, keys: { icc: false, log-opts.tag: { matches: Name }, insecure-registries: { absent: true }, hosts: { absent: true } } }",
        )
        .unwrap();
        let t = Target::root(d.path()).unwrap();
        // An empty list is no registry at all.
        assert_eq!(c.eval(&t).status, Status::Pass, "{:?}", c.eval(&t));
        fs::write(&file, r#"{"icc": true, "log-opts": {"tag": "{{.Name}}"}}"#).unwrap();
        assert_eq!(c.eval(&t).status, Status::Fail);
        fs::write(&file, "{\"icc\": false,\n").unwrap();
        let o = c.eval(&t);
        assert_eq!(o.status, Status::Fail);
        assert!(o.evidence[0].contains("daemon.json:2:"), "{o:?}");
        fs::remove_file(&file).unwrap();
        assert_eq!(c.eval(&t).status, Status::Fail);
        assert!(
            parse_check("json: { path: etc/x.json, keys: { a: 1 } }")
                .unwrap()
                .validate()
                .is_err()
        );
        assert!(parse_check("json: { path: /x.json, keys: { a: 1 }, extra: 2 }").is_err());
    }
}
