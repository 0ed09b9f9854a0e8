# Snakemake's report of a dataset, one rule per dataset: report-demo, report-voc, report-coco.
#
#   snakemake --cores 2 --report results/demo_report.html --report-after-run report-demo
#   snakemake --report results/demo_report.html report-demo      # once report-demo has run
#
# `ssr report` (workflow/pipeline.py: report_stage) turns the metrics files into tables beside the
# paper's figures, the dvclive curves into figures, and writes the params the runs used and a
# gallery; this file flags them, and the figures the pseudo_labels and evaluate stages drew, with
# report() (captions in workflow/report/). The rules are not in the
# dataset targets (`snakemake demo` plans exactly the DVC stages) nor in DVC, which has its own
# views of the same results (`dvc metrics show`, `dvc plots`).

# The figure files (ssr.figures.figure_name): why the image was picked, its rank, its id.
_FIGURE = r"{selection,random|worst}_{rank,\d+}_{image}.png"
_FIGURE_LABELS = {"picked": "{selection} {rank}", "image": "{image}"}
_GLANCE, _SEEDS, _VAL, _TRAIN, _CONFIG = ("0. At a glance", "1. Pseudo-labels (seed ablation)", "2. Segmentation (val split)",
                                          "3. Training", "4. Configuration")

for _ds in pipeline.DATASETS:
    _stage = pipeline.report_stage(PARAMS, RESOURCES, _ds)
    _in, _out = _stage.inputs, _stage.outputs

    rule:
        name:
            _stage.name
        input:
            classes=_in["classes"],
            models=_in["models"],
            metrics=_in["train"] + _in["seeds"] + _in["miou"] + _in["headline"],
            figures=report(_in["figures"][0], caption="../report/cam_figures.rst", category=_SEEDS,
                           subcategory="CAM figures", patterns=[_FIGURE], labels=_FIGURE_LABELS),
            predictions=report(_in["predictions"][0], caption="../report/prediction_figures.rst", category=_VAL,
                               subcategory="Prediction figures", patterns=[f"figures/{_FIGURE}"], labels=_FIGURE_LABELS),
        output:
            headline=report(_out["headline"][0], caption="../report/headline.rst", category=_GLANCE, subcategory="Headline"),
            comparison=report(_out["comparison"][0], caption="../report/comparison.rst", category=_GLANCE,
                              subcategory="Against the paper"),
            gallery=report(_out["gallery"][0], caption="../report/gallery.rst", category=_GLANCE, subcategory="Gallery"),
            seeds=report(_out["seeds"][0], caption="../report/seeds.rst", category=_SEEDS, subcategory="Tables"),
            seeds_classes=report(_out["seeds_classes"][0], caption="../report/seeds_classes.rst", category=_SEEDS,
                                 subcategory="Tables"),
            val=report(_out["val"][0], caption="../report/val.rst", category=_VAL, subcategory="Tables"),
            val_classes=report(_out["val_classes"][0], caption="../report/val_classes.rst", category=_VAL,
                               subcategory="Tables"),
            train=report(_out["train"][0], caption="../report/train.rst", category=_TRAIN, subcategory="Tables"),
            numbers=report(_out["numbers"][0], caption="../report/numbers.rst", category=_TRAIN,
                           subcategory="Every number (CSV)"),
            curves=report(directory(_out["curves"][0]), caption="../report/curves.rst", category=_TRAIN,
                          subcategory="Curves", patterns=["{quantity}.png"], labels={"quantity": "{quantity}"}),
            params=report(_out["params"][0], caption="../report/params.rst", category=_CONFIG, subcategory="Params"),
        log:
            _stage.log,
        params:
            tracked=pipeline.tracked(PARAMS, _stage),
            command=lambda wildcards, threads, _s=_stage: _s.cmd(threads),
        threads: _stage.threads
        resources:
            **_stage.resources,
        localrule: _stage.local
        conda:
            "../envs/ssr.yaml"
        shell:
            "({params.command}) > {log} 2>&1"
