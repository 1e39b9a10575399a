//! lorakit-export: adapters and merged models in llama.cpp's GGUF format. [`llama_cpp`] maps
//! Hugging Face module names and row orders to llama.cpp's; [`gguf_writer`] writes GGUF files
//! tensor by tensor under a temporary name; [`adapter_gguf`] converts LoRA adapters both ways;
//! [`merged_gguf`] folds an adapter into a GGUF base and writes the merged model;
//! [`hf_to_gguf`] does the same from a Hugging Face directory.
pub mod adapter_gguf;
pub mod error;
pub mod gguf_writer;
pub mod hf_to_gguf;
pub mod llama_cpp;
pub mod merged_gguf;

pub use error::{ExportError, Result};
