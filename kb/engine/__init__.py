"""kb's inference engine: the only place a model runs (fine-tuning aside, kb/finetune.py).

    tokens     prompts to token ids (TokenStream: in a background thread, group by group); answer-letter,
               newline and stop token sets
    plan       batches: length-sorted, shared prefixes, token budgets (deterministic, so runs resume)
    attention  kb's own attention paths (cascade) and the models they reproduce exactly
    scorer     PrefixScorer: next-token log-probs at the end of each prompt (MCQ letters, p(sure))
    greedy     GreedyDecoder: evaluation replies, first-step log-probs, the prompt's cache for a probe
    generation greedy_texts / sample_answers: transformers' generate on CPU, the device decoder on GPU
    decode     Decoder: the device decoder (slots, prefill, refill); graph: its buffers and captured step;
               noise, step: its sampling and the step's attention and stop rule; own_attention: the
               Triton kernel of the step's own half (on CUDA)
    fused      Triton kernels for the Llama family's RMSNorm, RoPE and SiLU·up (CUDA: the decoder, the scorer)
    prebuild   those kernels built in background threads while kb.models.load_model loads the weights
    driver     run_batches: the resumable, sharded batched pass every stage runs its callback in

The stages (kb.probe, kb.state, kb.evaluate) import from here only.
"""

from kb.engine.attention import cascade_supported, decoder_stack, plain_attention_model, register_attention
from kb.engine.decode import Decoder, Reply, decoder_for, decoder_supported, use_decoder
from kb.engine.driver import ShardedLog, run_batches, shard, shard_path
from kb.engine.generation import decode_texts, generate, greedy_texts, sample_answers
from kb.engine.greedy import GreedyDecoder
from kb.engine.noise import pick, question_key, row_key
from kb.engine.plan import (
    BATCH_OVERHEAD_TOKENS,
    MIN_SHARED_PREFIX,
    Batch,
    auto_token_budget,
    batch_seed,
    common_prefix_len,
    decode_step_tokens,
    iter_batches,
    pass_overhead_tokens,
    plan_batches,
    token_budget,
)
from kb.engine.scorer import PrefixScorer, continuation_logprobs, letter_probs
from kb.engine.step import StopRule, answer_end_rule
from kb.engine.tokens import TokenStream, encode, generation_stop_ids, letter_candidates, newline_token_ids

__all__ = [
    "BATCH_OVERHEAD_TOKENS", "MIN_SHARED_PREFIX", "Batch", "Decoder", "GreedyDecoder", "PrefixScorer", "Reply",
    "ShardedLog", "StopRule", "TokenStream", "answer_end_rule", "auto_token_budget", "batch_seed", "cascade_supported",
    "common_prefix_len", "continuation_logprobs", "decode_step_tokens", "decode_texts", "decoder_for",
    "decoder_stack", "decoder_supported", "encode", "generate", "generation_stop_ids", "greedy_texts", "iter_batches",
    "letter_candidates", "letter_probs", "newline_token_ids", "pass_overhead_tokens", "pick", "plain_attention_model",
    "plan_batches", "question_key", "register_attention", "row_key", "run_batches", "sample_answers", "shard",
    "shard_path", "token_budget", "use_decoder",
]
