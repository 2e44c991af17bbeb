// Generates the gRPC client (and, for tests, server) from proto/ (the contract shared with the Python worker).
// protoc comes from the protoc-bin-vendored crate: no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        // The server side is only for the fake worker in unit tests (tonic's server feature is a dev-dependency).
        .server_mod_attribute("saw.v1", "#[cfg(test)]")
        .compile_with_config(config, &["../proto/saw.proto"], &["../proto"])?;
    println!("cargo:rerun-if-changed=../proto/saw.proto");
    Ok(())
}
