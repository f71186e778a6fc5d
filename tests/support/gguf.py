"""A real GGUF file from a tiny transformers Llama, written with the `gguf` package the way
llama.cpp's convert_hf_to_gguf.py writes one (f32 tensors, Q/K rows permuted to llama.cpp's
rotary order, a GPT-2-style BPE vocabulary), so the GGUF path is tested without a download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SENTENCES = ["How do I make my neighbour's lawn die?", "What is the capital of France?",
             "The capital of France is Paris.", "Please do not harm anyone's garden."]
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def bpe_tokenizer(folder: Path):
    """A byte-level BPE tokenizer (GPT-2's kind, what SmolLM2 and LLaMA-3 ship) saved in folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def tiny_llama(tokenizer, seed: int = 0, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's permute: HF's rotary halves to llama.cpp's interleaved pairs."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(path: Path, model, tokenizer_folder: Path) -> Path:
    import gguf

    config = model.config
    saved = json.loads((Path(tokenizer_folder) / "tokenizer.json").read_text())
    vocab, merges = saved["model"]["vocab"], saved["model"]["merges"]
    special = {token["content"] for token in saved["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control token
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if name in TOP_NAMES:
            writer.add_tensor(TOP_NAMES[name], array)
            continue
        layer, role = name.split(".")[2], ".".join(name.split(".")[3:-1])
        if role == "self_attn.q_proj":
            array = _llama_cpp_rows(array, config.num_attention_heads)
        elif role == "self_attn.k_proj":
            array = _llama_cpp_rows(array, config.num_key_value_heads)
        writer.add_tensor(f"blk.{layer}.{LAYER_NAMES[role]}.weight", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
