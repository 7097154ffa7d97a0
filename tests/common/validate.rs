//! The validators that consumers of stemforge's outputs use, installed by
//! `make deps` into target/validators: xmlschema for OVF (DMTF DSP8023),
//! jsonschema for CycloneDX, pyspdxtools for SPDX. A missing validator
//! fails the test that needs it.

use std::path::{Path, PathBuf};
use stemforge::exec::cmd;

/// A program `make deps` installs into target/validators/bin.
pub fn validator(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/validators/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make deps` to install the validators",
        p.display()
    );
    p
}

/// The public schemas shared beside the project.
pub fn schemas(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/schemas")
        .join(sub)
}

/// Run a validator: Ok, or what it said. A crash of one of the scripts
/// below fails the test (it proves nothing either way).
fn run(program: PathBuf, args: &[&str], files: &[&Path]) -> Result<(), String> {
    let script = args.first() == Some(&"-c");
    let mut c = cmd(&program, args);
    for f in files {
        c = c.arg(f);
    }
    let out = c.run_unchecked().expect("the validator runs");
    let said = format!("{}{}", out.stdout_str(), out.stderr_str());
    assert!(
        !(script && said.contains("Traceback (most recent call last)")),
        "{} crashed:\n{said}",
        program.display()
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(said)
    }
}

/// Validates argv[2] against the OVF XSD in argv[1] with local files only:
/// the CIM schemas import common.xsd by URL, which maps to the local copy.
const OVF_CHECK: &str = r#"
import os, sys, xmlschema
xsd, doc = os.path.abspath(sys.argv[1]), sys.argv[2]
here = os.path.dirname(xsd)
local = {"http://schemas.dmtf.org/wbem/wscim/1/common.xsd": os.path.join(here, "common.xsd")}
schema = xmlschema.XMLSchema(xsd, allow="local", uri_mapper=lambda u: local.get(u, u))
errors = list(schema.iter_errors(doc))
for e in errors:
    print(e.path, e.reason)
sys.exit(1 if errors else 0)
"#;

/// An OVF envelope against DMTF DSP8023 1.1.1.
pub fn check_ovf(ovf: &Path) -> Result<(), String> {
    let xsd = schemas("ovf/dsp8023_1.1.1.xsd");
    run(validator("python"), &["-c", OVF_CHECK], &[&xsd, ovf])
}

/// Validates argv[2] against the CycloneDX 1.6 schema in directory
/// argv[1], its $refs resolved from that directory only (no network).
const CYCLONEDX_CHECK: &str = r#"
import json, pathlib, sys
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

schemas = pathlib.Path(sys.argv[1])
def load(name):
    return json.loads((schemas / name).read_text())
registry = Registry().with_resources(
    (name, Resource.from_contents(load(name), default_specification=DRAFT7))
    for name in ("spdx.SNAPSHOT.schema.json", "jsf-0.82.SNAPSHOT.schema.json")
)
validator = Draft7Validator(
    load("bom-1.6.SNAPSHOT.schema.json"),
    registry=registry,
    format_checker=Draft7Validator.FORMAT_CHECKER,
)
errors = list(validator.iter_errors(json.loads(pathlib.Path(sys.argv[2]).read_text())))
for e in errors[:20]:
    print("/".join(map(str, e.absolute_path)), e.message[:300], file=sys.stderr)
sys.exit(1 if errors else 0)
"#;

/// A CycloneDX JSON document against the official 1.6 schema.
pub fn check_cyclonedx(file: &Path) -> Result<(), String> {
    let dir = schemas("cyclonedx");
    run(validator("python"), &["-c", CYCLONEDX_CHECK], &[&dir, file])
}

/// An SPDX JSON document with pyspdxtools (silent when valid).
pub fn check_spdx(file: &Path) -> Result<(), String> {
    run(validator("pyspdxtools"), &["-i"], &[file])
}

/// Validates argv[2] against the XSD argv[1] with local files only.
const XSD_CHECK: &str = r#"
import sys, xmlschema
schema = xmlschema.XMLSchema(sys.argv[1], allow="local")
errors = list(schema.iter_errors(sys.argv[2]))
for e in errors[:20]:
    print(e.path, e.reason)
sys.exit(1 if errors else 0)
"#;

/// A JUnit report against the Surefire JUnit XSD CI systems read.
pub fn check_junit(file: &Path) -> Result<(), String> {
    let xsd = schemas("junit/junit-10.xsd");
    run(validator("python"), &["-c", XSD_CHECK], &[&xsd, file])
}

/// A STIG Viewer 2 checklist against DISA's checklist schema.
pub fn check_ckl(file: &Path) -> Result<(), String> {
    let xsd = schemas("ckl/U_Checklist_Schema_V2.xsd");
    run(validator("python"), &["-c", XSD_CHECK], &[&xsd, file])
}

/// Validates the JSON argv[2] against the JSON schema argv[1] (its
/// `$schema` picks the draft).
const JSON_SCHEMA_CHECK: &str = r#"
import json, pathlib, sys
from jsonschema.validators import validator_for
schema = json.loads(pathlib.Path(sys.argv[1]).read_text())
cls = validator_for(schema)
cls.check_schema(schema)
errors = list(cls(schema).iter_errors(json.loads(pathlib.Path(sys.argv[2]).read_text())))
for e in errors[:20]:
    print("/".join(map(str, e.absolute_path)), e.message[:300], file=sys.stderr)
sys.exit(1 if errors else 0)
"#;

/// A JSON document against a JSON schema file.
pub fn check_json_schema(schema: &Path, file: &Path) -> Result<(), String> {
    run(
        validator("python"),
        &["-c", JSON_SCHEMA_CHECK],
        &[schema, file],
    )
}
