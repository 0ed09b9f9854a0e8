# Evaluation: val-split mIoU (multi-scale + flip, optional DenseCRF), the DVC metric.


def retrain_input(wildcards):
    """The retrained segmenter, only when the multi-stage protocol is on."""
    if not RETRAIN:
        return {}
    return {
        "retrain": f"{RESULTS}/{wildcards.ds}/retrain",
        "retrain_metrics": f"{RESULTS}/{wildcards.ds}_retrain.json",
    }


rule evaluate:
    # Depends on the seeds json too, so one target runs the whole DAG.
    input:
        unpack(retrain_input),
        **DATASET_INPUTS,
        labels=f"{DATA}/{{ds}}/labels",
        model=f"{RESULTS}/{{ds}}/model.pt",
        seeds=f"{RESULTS}/{{ds}}_seeds.json",
        clip=demo_clip_input,
    output:
        f"{RESULTS}/{{ds}}_miou.json",
    params:
        tracked=tracked("datasets.{ds}", "infer", "retrain"),
    threads: 2
    resources:
        gpu=gpus,
    shell:
        "ssr evaluate --dataset {wildcards.ds} --params params.yaml"
