# Data stages: the canonical dataset layout, the committed demo CLIP, superpixels.


rule prepare:
    # voc/coco: download (checksummed, resumable) and convert; demo: generate.
    # image_labels.json is written last, so it marks a complete dataset.
    output:
        images=directory(f"{DATA}/{{ds}}/images"),
        labels=directory(f"{DATA}/{{ds}}/labels"),
        splits=directory(f"{DATA}/{{ds}}/splits"),
        classes=f"{DATA}/{{ds}}/classes.json",
        image_labels=f"{DATA}/{{ds}}/image_labels.json",
    params:
        tracked=tracked("datasets.{ds}", "{source}"),
    threads: 1
    shell:
        "ssr prepare --dataset {wildcards.ds} --params params.yaml"


rule demo_clip:
    # No inputs: the stage generates its own captioned images. Its outputs are
    # committed to git, so a fresh clone never re-runs it;
    # `snakemake --forcerun demo_clip` re-trains it.
    output:
        checkpoint=DEMO_CLIP,
        config=f"{DEMO_CLIP_DIR}/open_clip_config.json",
        provenance=f"{DEMO_CLIP_DIR}/provenance.json",
    threads: config["demo_clip"]["threads"]
    shell:
        "ssr demo-clip --params params.yaml"


rule superpixels:
    # SLIC + colour k-means regions per image, one HDF5 file (parallel over images).
    input:
        images=f"{DATA}/{{ds}}/images",
        splits=f"{DATA}/{{ds}}/splits",
        image_labels=f"{DATA}/{{ds}}/image_labels.json",
    output:
        f"{DATA}/{{ds}}/superpixels.h5",
    params:
        tracked=tracked("superpixels"),
    threads: config["superpixels"]["workers"]
    shell:
        "ssr superpixels --dataset {wildcards.ds} --params params.yaml"
