//! Files that are not step components are refused at load time with an
//! error that names the problem and the fix.

mod common;

use std::path::Path;

use common::sandbox;
use stepbox::sandbox::LoadError;
use stepbox_tests::guests;

fn load_bytes(bytes: &[u8]) -> LoadError {
    sandbox().load_bytes(Path::new("step.wasm"), bytes).expect_err("loading must fail")
}

#[test]
fn an_empty_file_is_refused() {
    let err = load_bytes(b"");
    assert!(matches!(err, LoadError::Empty { .. }), "{err}");
    assert_eq!(err.to_string(), "step.wasm is empty: expected a WebAssembly component built for wasm32-wasip2");
}

#[test]
fn a_file_that_is_not_wasm_is_refused() {
    let err = load_bytes(b"#!/bin/sh\necho hi\n");
    assert!(matches!(err, LoadError::NotWasm { .. }), "{err}");
    assert!(err.to_string().contains("is not WebAssembly"));
}

#[test]
fn a_core_module_is_refused_with_the_target_to_use() {
    let module = wat::parse_str("(module (func (export \"run\")))").unwrap();
    let err = load_bytes(&module);
    assert!(matches!(err, LoadError::CoreModule { .. }), "{err}");
    assert!(err.to_string().contains("wasm32-wasip2"), "{err}");
}

#[test]
fn a_truncated_component_is_refused() {
    let bytes = std::fs::read(guests::HELLO).unwrap();
    let err = load_bytes(&bytes[..bytes.len() / 2]);
    assert!(matches!(err, LoadError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("truncated or corrupt"), "{err}");
}

#[test]
fn a_missing_file_is_named() {
    let err = sandbox().load(Path::new("/no/such/step.wasm")).unwrap_err();
    assert!(matches!(err, LoadError::Read { .. }));
    assert!(err.to_string().starts_with("cannot read /no/such/step.wasm"), "{err}");
}

#[test]
fn a_component_that_is_neither_a_step_nor_a_command_is_refused_naming_its_exports() {
    let component = wat::parse_str(r#"(component (core module $m) (core instance $i (instantiate $m)))"#).unwrap();
    let err = sandbox().load_bytes(Path::new("library.wasm"), &component).unwrap_err();
    assert!(matches!(err, LoadError::MissingRun { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("exports neither `run` nor `wasi:cli/run`"), "{message}");
    assert!(message.contains("(its exports: none)"), "{message}");
}

#[test]
fn a_core_module_without_start_is_refused() {
    let err = sandbox().load_bytes(Path::new("lib.wasm"), &wat::parse_str("(module)").unwrap()).unwrap_err();
    assert!(matches!(err, LoadError::CoreModule { .. }), "{err}");
    assert!(err.to_string().contains("without a `_start` export"), "{err}");
}

#[test]
fn an_import_the_host_does_not_grant_is_named() {
    let component = wat::parse_str(
        r#"(component
             (import "acme:vault/secrets" (instance (export "steal" (func))))
           )"#,
    )
    .unwrap();
    let err = load_bytes(&component);
    assert!(matches!(&err, LoadError::UnknownImport { import, .. } if import == "acme:vault/secrets"), "{err}");
}

#[test]
fn a_run_export_of_the_wrong_type_is_refused() {
    let component = wat::parse_str(
        r#"(component
             (core module $m (func (export "f")))
             (core instance $i (instantiate $m))
             (func $run (canon lift (core func $i "f")))
             (export "run" (func $run))
           )"#,
    )
    .unwrap();
    let err = load_bytes(&component);
    assert!(matches!(err, LoadError::WrongRun { .. }), "{err}");
}

#[test]
fn every_example_loads_as_a_step_or_a_program() {
    for (name, path) in guests::ALL {
        let component = sandbox().load(Path::new(path)).unwrap_or_else(|err| panic!("{name}: {err}"));
        let program = ["wordcount", "scratch-fill"].iter().any(|plain| name.starts_with(plain));
        assert_eq!(component.is_command(), program, "{name}");
    }
}
