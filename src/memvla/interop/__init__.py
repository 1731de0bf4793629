"""Loading other libraries' checkpoints (safetensors only, never unpickled) into memvla's
modules: :mod:`memvla.interop.hf_mamba` for Hugging Face ``MambaModel`` directories."""
