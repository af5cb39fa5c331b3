"""Files in and out: atomic writes, the checkpoints users hold, Hugging Face CLIP and peft LoRA.

    atomic.py       atomic_write: every file the package writes is written whole or not at all
    checkpoints.py  torch / safetensors / pickled checkpoints read into plain state dicts, no foreign code run
    hf_clip.py      Hugging Face CLIP vision checkpoints as open_clip state dicts and banks
    lora.py         peft LoRA adapters as low-rank task vectors
"""
