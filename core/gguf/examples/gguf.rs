//! Inspect a GGUF file or convert a Llama-family one to Hugging Face layout.
//!
//! ```text
//! cargo run --release -p sipt-gguf --example gguf -- inspect FILE.gguf
//! cargo run --release -p sipt-gguf --example gguf -- convert FILE.gguf OUT_DIR
//! ```

use std::path::Path;
use std::process::ExitCode;

use sipt_gguf::{convert_llama, GgufError, GgufFile};

fn inspect(path: &Path) -> Result<(), GgufError> {
    let f = GgufFile::open(path)?;
    println!(
        "GGUF v{} ({} bytes), alignment {}, data at {}",
        f.version(),
        f.file_len(),
        f.alignment(),
        f.data_offset()
    );
    println!("{} metadata entries:", f.metadata().len());
    for (k, v) in f.metadata() {
        let shown = match v.as_array() {
            Some(items) if !items.is_empty() => {
                let head: Vec<String> = items.iter().take(5).map(|i| i.describe()).collect();
                format!("{} [{}, ...]", v.describe(), head.join(", "))
            }
            _ => v.describe(),
        };
        println!("  {k} = {shown}");
    }
    println!("{} tensors:", f.tensors().len());
    for t in f.tensors() {
        println!("  {} {:?} {} @{}", t.name, t.shape(), t.ggml_type, t.offset);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["inspect", file] => inspect(Path::new(file)),
        ["convert", file, out] => convert_llama(Path::new(file), Path::new(out)).map(|s| {
            println!("{s:#?}");
        }),
        _ => {
            eprintln!("usage: gguf inspect FILE.gguf | gguf convert FILE.gguf OUT_DIR");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
