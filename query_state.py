"""Query a model's knowledge state per question: correctness (Cor) and certainty (Cer) (CRaFT stage 1).

Multiple choice (exact, one forward pass): Cor = p(gold) over the renormalised letters, Cer = sum p log p
(`cer_agree` = sum p^2, the card's pairwise agreement, is stored too; `--mcq-cer agreement` makes it `cer`).
Open answers: N answers sampled at temperature 1.0; Cor = fraction correct, Cer = mean pairwise cosine of
their all-MiniLM-L6-v2 embeddings. Per question also the last-layer state at the last prompt token.
Defaults follow CRaFT: 5-shot MMLU (shots from dev) without a chat template; 3-shot open QA (shots from
the training split minus the queried questions and their answers) through the chat template when the
model has one, the shots as earlier user/assistant turns. Sampled answers are cut at the first period.

Inputs: a registered dataset split (kb/registry.yaml). Outputs (<name> = <Dataset>_<split>_<k>shot):
  training_data/<model>/state_<name>.jsonl (+ .meta.json)   StateRecord per question (kb/statefile.py)
  training_data/<model>/state_<name>.reps.npy (+ .reps.json) representations [n, hidden], ids in row order
  results/<model>/state_<name>.json                          summary (mean Cor/Cer, rehearsable count)

    python query_state.py --model smollm2-135m --dataset mmlu --limit 200
    python query_state.py --model smollm2-135m --dataset pararel --limit 100 --n-samples 10
"""

from __future__ import annotations

import argparse

from kb.config import add_common_args, default_batch_size, parse_with_config
from kb.distributed import setup as setup_dist
from kb.errors import cli_main
from kb.layout import data_dir, results_dir, source_name, state_records
from kb.locks import lock_output, rank_path
from kb.models import load_model, model_label
from kb.prompts import kind_budget
from kb.provenance import recorded_args
from kb.state import run_state_query
from kb.state_settings import check_query_args, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.set_defaults(chat_template=None)  # None: off for multiple choice, auto for open answers (CRaFT)
    p.add_argument("--dataset", default="mmlu", help="any dataset in kb/registry.yaml (mmlu, pararel, ...)")
    p.add_argument("--split", default="ID_train", help="registered split (MMLU and ParaRel: ID_train)")
    p.add_argument("--shots", type=int, default=None, help="solved examples before each question (default 5 MCQ, 3 open)")
    p.add_argument("--template", default=None,
                   help="prompt template (default: the dataset's `query` role in kb/registry.yaml; mcq_harness, "
                        "open: open_short as chat turns, open_rtuning without chat)")
    p.add_argument("--mcq-cer", default="entropy", choices=["entropy", "agreement"],
                   help="MCQ certainty stored as `cer`: sum p log p (CRaFT) or sum p^2 (the card's agreement)")
    p.add_argument("--n-samples", type=int, default=10, help="open: answers sampled per question")
    p.add_argument("--temperature", type=float, default=1.0, help="open: sampling temperature")
    p.add_argument("--max-new-tokens", type=int, default=kind_budget("open", "query"),
                   help="open: tokens per sampled answer (default: kb/registry.yaml's query budget)")
    p.add_argument("--embedder", default=None,
                   help="open: sentence-transformers name or dir (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--rep-dtype", default="float16", choices=["float16", "float32"],
                   help="storage type of the question representations")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_with_config(build_parser(), argv)
    check_query_args(args)
    # One writer per state file: a second run stops here, before it loads the model.
    lock_output(rank_path(state_records(data_dir(args.output_dir, model_label(args.model, args.adapter)),
                                        source_name(args.dataset, args.split, args.shots))))
    dist = setup_dist()  # torchrun / accelerate launch: one rank per GPU, see kb/distributed.py
    lm = load_model(args.model, dist.device(args.device), args.dtype, args.adapter, args.trust_remote_code,
                    revision=args.revision)
    args.batch_size = default_batch_size(args.batch_size, lm.device)
    settings = settings_from_args(args, lm.tokenizer)
    run_state_query(settings, lm, data_dir(args.output_dir, lm.label), results_dir(args.results_dir, lm.label),
                    settings.name(), restart=args.restart, max_batch_tokens=args.max_batch_tokens,
                    extra_meta={"args": recorded_args(args)}, dist=dist, data_root=args.data_root)


if __name__ == "__main__":
    main()
