# Model stages: SSR training, pseudo-label export, optional retraining.

# Every input a stage reads from the canonical dataset layout.
DATASET_INPUTS = {
    "images": f"{DATA}/{{ds}}/images",
    "splits": f"{DATA}/{{ds}}/splits",
    "classes": f"{DATA}/{{ds}}/classes.json",
    "image_labels": f"{DATA}/{{ds}}/image_labels.json",
}


rule train:
    # Single-stage SSR on image-level labels; resumes from its last checkpoint.
    input:
        **DATASET_INPUTS,
        superpixels=f"{DATA}/{{ds}}/superpixels.h5",
        clip=demo_clip_input,
    output:
        model=f"{RESULTS}/{{ds}}/model.pt",
        metrics=f"{RESULTS}/{{ds}}_train.json",
        dvclive=directory(f"{RESULTS}/{{ds}}/dvclive"),
    params:
        tracked=tracked("datasets.{ds}", "train", "train_presets.{preset}", "affinity", "sgc", "cmpa", "pseudo_labels"),
    threads: config["train"]["num_workers"] + 1
    resources:
        gpu=gpus,
    shell:
        "ssr train --dataset {wildcards.ds} --params params.yaml"


rule pseudo_labels:
    # Refined-CAM pseudo-labels for the train split, scored against ground truth (seed mIoU).
    input:
        **DATASET_INPUTS,
        labels=f"{DATA}/{{ds}}/labels",
        superpixels=f"{DATA}/{{ds}}/superpixels.h5",
        model=f"{RESULTS}/{{ds}}/model.pt",
        clip=demo_clip_input,
    output:
        pseudo_labels=directory(f"{RESULTS}/{{ds}}/pseudo_labels"),
        metrics=f"{RESULTS}/{{ds}}_seeds.json",
        figures=directory(f"{RESULTS}/{{ds}}/figures"),
    params:
        tracked=tracked("datasets.{ds}", "affinity", "sgc", "cmpa", "pseudo_labels"),
    threads: 2
    resources:
        gpu=gpus,
    shell:
        "ssr pseudo-labels --dataset {wildcards.ds} --params params.yaml"


rule retrain:
    # Multi-stage protocol: a fully supervised segmenter on the exported pseudo-labels.
    # Part of the DAG only when params.yaml sets retrain.enabled: true.
    input:
        **DATASET_INPUTS,
        labels=f"{DATA}/{{ds}}/labels",
        pseudo_labels=f"{RESULTS}/{{ds}}/pseudo_labels",
    output:
        retrain=directory(f"{RESULTS}/{{ds}}/retrain"),
        metrics=f"{RESULTS}/{{ds}}_retrain.json",
    params:
        tracked=tracked("datasets.{ds}", "retrain"),
    threads: config["train"]["num_workers"] + 1
    resources:
        gpu=gpus,
    shell:
        "ssr retrain --dataset {wildcards.ds} --params params.yaml"
