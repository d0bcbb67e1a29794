//! The generated code in `src/gen/` is checked in so that building relaymesh needs no `protoc`
//! and no code generator. This test regenerates it with `protox` (a pure-Rust protobuf compiler)
//! and fails when the checked-in copy differs from what `relaymesh/v1/mesh.proto` produces.
//!
//! After editing the `.proto`, run `RELAYMESH_BLESS=1 cargo test -p relaymesh-proto --test codegen`
//! to rewrite `src/gen/` and commit the result.

use std::path::Path;

#[test]
fn generated_code_matches_proto() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(["relaymesh/v1/mesh.proto"], [root]).expect("compile .proto");
    let out = tempdir("mesh");
    prost_build::Config::new()
        .out_dir(&out)
        // Payloads and every other `bytes` field decode as `bytes::Bytes`: slices of the
        // received frame, no copy.
        .bytes(["."])
        .compile_fds(fds)
        .expect("generate Rust code");
    let fresh = std::fs::read_to_string(out.join("relaymesh.v1.rs")).expect("read generated");
    let checked_in_path = root.join("src/gen/relaymesh.v1.rs");
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&out);
    if fresh != checked_in {
        if std::env::var_os("RELAYMESH_BLESS").is_some() {
            std::fs::create_dir_all(checked_in_path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&checked_in_path, fresh).expect("write generated code");
        } else {
            panic!(
                "{} is out of date with relaymesh/v1/mesh.proto; rerun with RELAYMESH_BLESS=1 and commit",
                checked_in_path.display()
            );
        }
    }
}

/// A directory of this test process's own for test `name` (tests run in parallel).
fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("relaymesh-codegen-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// The admin API (`relaymesh/admin/v1/admin.proto`): messages, tonic server and client stubs,
/// and the encoded descriptor set server reflection serves, all checked in like the above.
#[test]
fn generated_admin_code_matches_proto() {
    use prost::Message as _;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds =
        protox::compile(["relaymesh/admin/v1/admin.proto"], [root]).expect("compile admin .proto");
    let descriptor = fds.encode_to_vec();
    let out = tempdir("admin");
    // The same messages serve the HTTP JSON twin of the API (`POST /api/<method>`).
    let payload = "#[serde(with = \"crate::json::base64\")]";
    tonic_prost_build::configure()
        .out_dir(&out)
        .build_transport(false)
        .type_attribute(
            ".relaymesh.admin.v1",
            "#[derive(serde::Serialize, serde::Deserialize)]\n#[serde(default)]",
        )
        .field_attribute(".relaymesh.admin.v1.PublishRequest.payload", payload)
        .field_attribute(".relaymesh.admin.v1.BroadcastRequest.payload", payload)
        .compile_fds(fds)
        .expect("generate admin code");
    let fresh = std::fs::read(out.join("relaymesh.admin.v1.rs")).expect("read generated");
    let _ = std::fs::remove_dir_all(&out);
    check(root.join("src/gen/relaymesh.admin.v1.rs"), &fresh);
    check(root.join("src/gen/admin_descriptor.bin"), &descriptor);
}

/// Fails when `path` differs from `fresh`, or rewrites it with `RELAYMESH_BLESS` set.
fn check(path: std::path::PathBuf, fresh: &[u8]) {
    if std::fs::read(&path).unwrap_or_default() == fresh {
        return;
    }
    if std::env::var_os("RELAYMESH_BLESS").is_some() {
        std::fs::write(&path, fresh).expect("write generated code");
    } else {
        panic!(
            "{} is out of date with its .proto; rerun with RELAYMESH_BLESS=1 and commit",
            path.display()
        );
    }
}
