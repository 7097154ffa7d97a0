//! Loading YAML documents with errors that name the file, line, column and
//! key, so a typo in a profile or a stage is found without guessing.

use serde::de::DeserializeOwned;
use std::fmt;
use std::path::{Path, PathBuf};

/// A problem in a configuration file: what the CLI reports with exit code 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file as the user knows it (a path in the repository or on disk).
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Dotted key path (`disk.partitions[2].size`), when known.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl ConfigError {
    pub fn new(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            line: None,
            column: None,
            key: None,
            message: message.into(),
        }
    }

    /// An error about `key`, located at the first line of `text` that
    /// matches `needle` (a regular expression) at or after line `from`.
    pub fn at(
        file: impl Into<PathBuf>,
        text: &str,
        key: impl Into<String>,
        needle: &str,
        message: impl Into<String>,
    ) -> Self {
        let mut e = ConfigError::new(file, message);
        e.key = Some(key.into());
        e.line = locate(text, needle, 1);
        e
    }

    pub fn with_line(mut self, line: Option<usize>) -> Self {
        self.line = line;
        self
    }

    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

/// The first 1-based line number at or after `from` whose text matches the
/// regular expression `needle`.
pub fn locate(text: &str, needle: &str, from: usize) -> Option<usize> {
    let re = regex::Regex::new(needle).ok()?;
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| re.is_match(l))
        .map(|(i, _)| i + 1)
}

/// Every 1-based line number whose text matches `needle`.
pub fn locate_all(text: &str, needle: &str) -> Vec<usize> {
    match regex::Regex::new(needle) {
        Ok(re) => text
            .lines()
            .enumerate()
            .filter(|(_, l)| re.is_match(l))
            .map(|(i, _)| i + 1)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Deserialize `text` (the contents of `file`) into `T`, turning serde_yaml's
/// error into a [`ConfigError`] with line, column and key.
pub fn parse_yaml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::new(file, "the file is empty"));
    }
    serde_yaml::from_str(text).map_err(|e| from_yaml_error(file, &e))
}

fn from_yaml_error(file: &Path, e: &serde_yaml::Error) -> ConfigError {
    let (line, column) = match e.location() {
        Some(loc) => (Some(loc.line()), Some(loc.column())),
        None => (None, None),
    };
    let mut text = e.to_string();
    // serde_yaml appends " at line N column M"; we print the location first.
    if let Some(idx) = text.rfind(" at line ") {
        text.truncate(idx);
    }
    // It prefixes the message with the path of the containing value.
    let (mut key, mut message) = match text.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') && !path.is_empty() => {
            (Some(path.to_string()), rest.to_string())
        }
        _ => (None, text.clone()),
    };
    // "unknown field `x`" is about key x itself.
    if let Some(field) = backticked_after(&message, "unknown field `") {
        key = Some(match key {
            Some(k) => format!("{k}.{field}"),
            None => field.to_string(),
        });
    } else if let Some(field) = backticked_after(&message, "missing field `") {
        key = Some(match key {
            Some(k) => format!("{k}.{field}"),
            None => field.to_string(),
        });
    }
    // Serde names the Rust type where the file has a map or a number.
    let rust_type = regex::Regex::new(r"expected struct [A-Za-z0-9_]+$").expect("static regex");
    message = rust_type.replace(&message, "expected a map").into_owned();
    for t in ["u8", "u16", "u32", "u64", "usize"] {
        if let Some(head) = message.strip_suffix(&format!("expected {t}")) {
            message = format!("{head}expected a whole number, 0 or more");
        }
    }
    if message.is_empty() {
        message = "invalid YAML".to_string();
    }
    ConfigError {
        file: file.to_path_buf(),
        line,
        column,
        key,
        message,
    }
}

fn backticked_after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let start = text.find(prefix)? + prefix.len();
    let end = text[start..].find('`')? + start;
    Some(&text[start..end])
}

/// Parse a size such as `512MiB`, `2GiB`, `5G` or `1048576` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. 512MiB or 2GiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return Err(format!("invalid size {s:?} (units: KiB, MiB, GiB, TiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Format bytes the way profiles write them (`512MiB`, `2GiB`, `1.5GiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, mult) in UNITS {
        if bytes >= mult {
            if bytes % mult == 0 {
                return format!("{}{name}", bytes / mult);
            }
            return format!("{:.1}{name}", bytes as f64 / mult as f64);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        size: String,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        parts: Vec<Inner>,
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = "name: x\nparts:\n  - size: 1\n  - sizee: 2\n";
        let e = parse_yaml::<Outer>(Path::new("p.yml"), text).unwrap_err();
        assert_eq!(e.line, Some(4));
        assert_eq!(e.key.as_deref(), Some("parts[1].sizee"));
        let shown = e.to_string();
        assert!(shown.starts_with("p.yml:4:"), "{shown}");
        assert!(shown.contains("unknown field `sizee`"), "{shown}");
    }

    #[test]
    fn missing_key_is_named() {
        let e = parse_yaml::<Outer>(Path::new("p.yml"), "parts: []\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("name"));
    }

    #[test]
    fn rust_type_names_are_not_shown() {
        let e = parse_yaml::<Outer>(Path::new("p.yml"), "- name: x\n").unwrap_err();
        assert!(e.message.ends_with("expected a map"), "{e}");
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Count {
            n: u32,
        }
        let e = parse_yaml::<Count>(Path::new("p.yml"), "n: -1\n").unwrap_err();
        assert!(
            e.message.ends_with("expected a whole number, 0 or more"),
            "{e}"
        );
    }

    #[test]
    fn empty_file_is_an_error() {
        let e = parse_yaml::<Outer>(Path::new("p.yml"), "  \n").unwrap_err();
        assert!(e.to_string().contains("empty"));
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("5G").unwrap(), 5 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("MiB").is_err());
        assert_eq!(format_size(512 << 20), "512MiB");
        assert_eq!(format_size(3 << 29), "1.5GiB");
    }

    #[test]
    fn locate_finds_lines() {
        let t = "a: 1\nid: x\nid: y\nid: x\n";
        assert_eq!(locate(t, r"^id:\s*x\s*$", 1), Some(2));
        assert_eq!(locate(t, r"^id:\s*x\s*$", 3), Some(4));
        assert_eq!(locate_all(t, r"^id:"), vec![2, 3, 4]);
    }
}
