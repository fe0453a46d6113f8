//! The contract as a product: `proto/` is linted by buf, and checked against
//! the released contract (`proto/released/contract.json`, a buf image) for
//! changes that would break deployed clients. `.ci/run` runs both; this
//! test shows the check catches what it must (`npm ci --prefix tools`
//! installs buf).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn buf(args: &[&str], dir: &Path) -> Output {
    let buf = repo().join("tools/node_modules/.bin/buf");
    assert!(
        buf.exists(),
        "buf is not installed: run `npm ci --prefix tools`"
    );
    Command::new(buf)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("buf runs")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of the contract's proto files, with `edit` applied to one of them.
fn contract_with(edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let proto = repo().join("proto");
    std::fs::copy(proto.join("buf.yaml"), dir.path().join("buf.yaml")).unwrap();
    for package in ["orders", "stock", "shipping", "payment"] {
        copy_dir(&proto.join(package), &dir.path().join(package));
    }
    let orders = dir.path().join("orders/v1/orders.proto");
    let text = std::fs::read_to_string(&orders).unwrap();
    std::fs::write(&orders, edit(text)).unwrap();
    dir
}

fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn buf_lints_the_contract_and_refuses_a_breaking_change() {
    let released = repo().join("proto/released/contract.json");
    let released = released.to_str().unwrap();

    let lint = buf(&["lint", "proto"], &repo());
    assert!(lint.status.success(), "buf lint: {}", said(&lint));
    let current = buf(&["breaking", "proto", "--against", released], &repo());
    assert!(
        current.status.success(),
        "proto/ breaks the released contract: {}",
        said(&current)
    );

    // The same files, unchanged, pass; a field renumbered does not.
    let unchanged = contract_with(|text| text);
    let check = |dir: &Path| buf(&["breaking", ".", "--against", released], dir);
    let passed = check(unchanged.path());
    assert!(passed.status.success(), "{}", said(&passed));
    let renumbered = contract_with(|text| {
        assert!(text.contains("  string customer_id = 3;"));
        text.replacen("  string customer_id = 3;", "  string customer_id = 30;", 1)
    });
    let refused = check(renumbered.path());
    assert!(!refused.status.success(), "a renumbered field passed");
    assert!(
        said(&refused).contains("\"customer_id\""),
        "the refusal names the field: {}",
        said(&refused)
    );
}
