#!/usr/bin/env bash
# The whole study for one model: R-Tuning (probe -> refusal-aware data -> SFT -> evaluate) and CRaFT
# (state -> rehearsal flow -> RAIT sets -> SFT of each from M0 -> evaluate), then the report.
# Sourced by scripts/run_<model>.sh, which set these and then call `kb_pipeline "$@"`:
#   MODEL             --model value: hub id, offline alias or local dir            (required)
#   MODEL_FLAGS       array of extra model flags, e.g. (--trust-remote-code --revision <commit> --dtype bfloat16)
#   RTUNING_RECIPE    fine-tune recipe for R-Tuning data        (default configs/finetune_rtuning.yaml)
#   REHEARSAL_RECIPE  recipe for the rehearsal SFT, MCQ track   (default configs/finetune_craft_mcq_lora.yaml)
#   RAIT_RECIPE       recipe for each RAIT set, MCQ track       (default configs/finetune_craft_mcq_lora.yaml)
#   REHEARSAL_OPEN_RECIPE / RAIT_OPEN_RECIPE   the same for the open-answer (ParaRel) track
#   REHEARSAL_FLAGS / REHEARSAL_OPEN_FLAGS     arrays of extra rehearsal_finetune.py flags per track, e.g.
#                     (--min-cor 0.6) for models too small to have p(gold) > 0.99 anywhere (recorded as relaxed)
#   SHOTS             MMLU probing shots (default 5, R-Tuning's setting)
#   PY                python to run (default .venv/bin/python when present, else python)
# Launcher flags:
#   --dry-run   print every command, one per line, and run nothing
#   --limit N   N questions per probe/state/eval set (a smoke run; default: the full sets)
#   --skip-rtuning / --skip-craft   run only one of the two studies
# Every stage resumes where it stopped: rerun the same launcher after an interruption.
set -euo pipefail

kb_pipeline() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  local dry=0 limit="" do_rtuning=1 do_craft=1
  while (($#)); do
    case "$1" in
      --dry-run) dry=1 ;;
      --limit) limit=${2:?--limit needs a number}; shift ;;
      --skip-rtuning) do_rtuning=0 ;;
      --skip-craft) do_craft=0 ;;
      -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; return 0 ;;
      *) echo "error: unknown launcher flag $1 (see --help)" >&2; return 2 ;;
    esac
    shift
  done
  : "${MODEL:?MODEL must be set by the launcher}"
  local old
  for old in RTUNING_CONFIG REHEARSAL_CONFIG RAIT_CONFIG REHEARSAL_OPEN_CONFIG RAIT_OPEN_CONFIG; do
    if [[ -n ${!old:-} ]]; then  # renamed, so that "config" means a flags file everywhere
      echo "error: $old is now ${old%_CONFIG}_RECIPE" >&2; return 2
    fi
  done
  local py=${PY:-}
  if [[ -z $py ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python; fi
  fi
  local -a mf=("${MODEL_FLAGS[@]+"${MODEL_FLAGS[@]}"}")
  # build_rait.py loads only a tokenizer: it takes --trust-remote-code but no --dtype (the revision comes
  # from the state file, which pins the model it was made with)
  local -a bf=()
  [[ " ${mf[*]} " == *" --trust-remote-code "* ]] && bf=(--trust-remote-code)
  local -a reh_flags=("${REHEARSAL_FLAGS[@]+"${REHEARSAL_FLAGS[@]}"}")
  local -a reh_open_flags=("${REHEARSAL_OPEN_FLAGS[@]+"${REHEARSAL_OPEN_FLAGS[@]}"}")
  local -a lim=()
  [[ -n $limit ]] && lim=(--limit "$limit")
  local shots=${SHOTS:-5}
  local rt_recipe=${RTUNING_RECIPE:-configs/finetune_rtuning.yaml}
  local reh_recipe=${REHEARSAL_RECIPE:-configs/finetune_craft_mcq_lora.yaml}
  local rait_recipe=${RAIT_RECIPE:-configs/finetune_craft_mcq_lora.yaml}
  local reh_open_recipe=${REHEARSAL_OPEN_RECIPE:-configs/finetune_craft_open_full.yaml}
  local rait_open_recipe=${RAIT_OPEN_RECIPE:-configs/finetune_craft_open_full.yaml}
  # Every file and folder name comes from kb/layout.py, the stages' own naming (no model loads).
  names() { "$py" -m kb.layout "$@"; }
  local label
  label=$(names label --model "$MODEL")  # the folder every stage writes under
  local rait_methods=van,cor_rait,corcer_rait,craft_wo_cer,craft

  run() {
    if ((dry)); then
      local line
      printf -v line '%q ' "$@"
      echo "${line% }"
    else
      echo "+ $*" >&2
      "$@"
    fi
  }

  # Test sets (docs/method.md section 8): R-Tuning's MMLU and ParaRel ID/OOD splits; CRaFT's MCQ track adds
  # MMLU val (ID) and ARC-Challenge (OOD); its open track reuses ParaRel's.
  local -a rt_mcq=(--test mmlu:ID_test --test mmlu:OOD_test) open_tests=(--test pararel:ID_test --test pararel:OOD_test)
  local -a craft_mcq=(--test mmlu:val --test arc_challenge:test) init_tests=()
  ((do_rtuning)) && init_tests+=("${rt_mcq[@]}")
  ((do_craft)) && init_tests+=("${craft_mcq[@]}")
  init_tests+=("${open_tests[@]}")

  # R-Tuning Task 2.1: the knowledge boundary of M0 on the training sets.
  run "$py" run_MMLU.py --model "$MODEL" "${mf[@]}" --domain ID --split train --shots "$shots" --method all "${lim[@]}"
  run "$py" run_ParaRel.py --model "$MODEL" "${mf[@]}" --domain ID --split train --method all "${lim[@]}"
  # The initial model first: every tuned row's THS is taken against its BASIC run on the same test set.
  run "$py" evaluate.py --model "$MODEL" "${mf[@]}" "${init_tests[@]}" "${lim[@]}"

  if ((do_rtuning)); then
    # Task 2.2.1: full fine-tune of M0 on the `unsure` (padding) data, then Pc/Pw/Pr, THS and AP.
    local ds probe train out
    local -a rt_runs=()
    for ds in mmlu pararel; do
      probe=$(names probe-name --dataset "$ds" --split ID_train --shots "$shots")
      train=$(names rtuning-set --model "$MODEL" --dataset "$ds" --split ID_train --shots "$shots" --method unsure)
      out=$(names tuned-dir --model "$MODEL" --method rtuning_unsure --source "$probe")
      run "$py" finetune.py --model "$MODEL" "${mf[@]}" --recipe "$rt_recipe" --train-file "$train" --output-dir "$out"
      rt_runs+=("$out")
    done
    run "$py" evaluate.py --model "${rt_runs[0]}" "${mf[@]}" --method rtuning_unsure "${rt_mcq[@]}" "${lim[@]}"
    run "$py" evaluate.py --model "${rt_runs[1]}" "${mf[@]}" --method rtuning_unsure "${open_tests[@]}" "${lim[@]}"
  fi

  if ((do_craft)); then
    # CRaFT, MCQ track (source: MMLU ID train, 5-shot state) and open track (source: ParaRel ID train, 3-shot).
    local track dataset reh rait name i text
    local -a tests rf methods sets dirs
    IFS=, read -r -a methods <<< "$rait_methods"
    for track in mcq open; do
      if [[ $track == mcq ]]; then
        dataset=mmlu reh=$reh_recipe rait=$rait_recipe tests=("${craft_mcq[@]}")
        rf=("${reh_flags[@]+"${reh_flags[@]}"}")
      else
        dataset=pararel reh=$reh_open_recipe rait=$rait_open_recipe tests=("${open_tests[@]}")
        rf=("${reh_open_flags[@]+"${reh_open_flags[@]}"}")
      fi
      name=$(names source-name --dataset "$dataset" --split ID_train)  # the state query's default shots
      text=$(names rait-set --model "$MODEL" --dataset "$dataset" --split ID_train --method "$rait_methods" --text2text)
      mapfile -t sets <<< "$text"
      text=$(names tuned-dir --model "$MODEL" --method "$rait_methods" --source "$name")
      mapfile -t dirs <<< "$text"
      run "$py" query_state.py --model "$MODEL" "${mf[@]}" --dataset "$dataset" --split ID_train "${lim[@]}"
      run "$py" rehearsal_finetune.py --model "$MODEL" "${mf[@]}" --dataset "$dataset" --split ID_train \
        --recipe "$reh" "${rf[@]+"${rf[@]}"}"
      run "$py" build_rait.py --model "$MODEL" "${bf[@]}" --dataset "$dataset" --split ID_train
      for i in "${!methods[@]}"; do
        # Every RAIT set is trained from M0 (never from the rehearsed model), then evaluated under REFUSE.
        run "$py" finetune.py --model "$MODEL" "${mf[@]}" --recipe "$rait" \
          --train-file "${sets[i]}" --output-dir "${dirs[i]}"
        run "$py" evaluate.py --model "${dirs[i]}" "${mf[@]}" --method "${methods[i]}" "${tests[@]}" "${lim[@]}"
      done
    done
  fi

  run "$py" report.py --models "$label"
}
