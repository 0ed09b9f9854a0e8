# One rule per stage and dataset (plus demo_clip), built from workflow/pipeline.py,
# which says what each stage runs, reads and writes. Names are <stage>-<dataset>.
#
# - Every rule logs to logs/<name>.log and passes its thread count on
#   (`--threads N` with N = {threads}; a torchrun job gives each process its share).
# - train always resumes (`--resume`) from the checkpoints of its runs, which are
#   not declared outputs, so that a killed or failed job's retry continues where
#   it stopped; workflow/scripts/checkpoints.py first sets aside checkpoints
#   written from other params or inputs. The dvclive curves beside them are not
#   declared either (Snakemake would delete them before the retry); DVC declares
#   them with `persist: true`.
# - With datasets.{ds}.gpus > 1 train runs `torchrun --standalone
#   --nproc_per_node N -m ssr train ...` on one node (resources gpu=N, nodes=1).
# - A metrics file that stands without the products of its stage (the committed
#   reference on a fresh clone) is not declared as that stage's output: a guard
#   rule claims it and refuses, so it is never taken for a result.

for _stage in STAGES:
    _reference = pipeline.reference_only(_stage)
    _outputs = {
        name: [directory(p) if p in _stage.directories else p for p in paths if not (_reference and p == _stage.metric)]
        for name, paths in _stage.outputs.items()
    }

    rule:
        name:
            _stage.name
        input:
            # a committed reference metrics file stands for its stage's products (pipeline.snakemake_inputs)
            **pipeline.snakemake_inputs(_stage, STAGES),
        output:
            **{name: paths for name, paths in _outputs.items() if paths},
        log:
            _stage.log,
        params:
            tracked=pipeline.tracked(PARAMS, _stage),
            # The command with the job's threads (a torchrun process gets its share).
            # Not written into `shell:` itself, which Snakemake evaluates when the
            # job runs, after this loop has moved on.
            command=lambda wildcards, threads, _s=_stage: _s.cmd(_s.threads_per_process(threads)),
        threads: _stage.threads
        resources:
            **_stage.resources,
        localrule: _stage.local
        conda:
            "../envs/ssr.yaml"
        shell:
            "({params.command}) > {log} 2>&1"

    if _reference:

        rule:
            name:
                f"reference-{_stage.name}"
            input:
                lambda wildcards, _s=_stage: pipeline.refuse_reference(_s),
            output:
                _stage.metric,
            log:
                f"{pipeline.LOGS}/reference-{_stage.name}.log",
            localrule: True
            conda:
                "../envs/ssr.yaml"
            shell:
                "false"
