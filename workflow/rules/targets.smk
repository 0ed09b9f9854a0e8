# Targets: one per dataset (`snakemake demo`, `voc`, `coco`); `all`, the default
# target, is the demo (in the Snakefile: an included file cannot set the default).
# Each asks for every product of every stage of its dataset: models, exported
# pseudo-labels, predictions... files that only a run creates, so a checkout
# without data/ and results/{ds}/ always computes the dataset from scratch,
# whatever the committed metrics files' mtimes. The metrics files are asked for
# too, except a committed reference whose stage has not run here (that stage
# runs anyway for its other products, and rewrites it).

for _ds in pipeline.DATASETS:

    rule:
        name:
            _ds
        input:
            [
                p
                for s in STAGES
                if s.dataset == _ds
                for p in (s.products if pipeline.reference_only(s) else s.output_paths)
            ],
        localrule: True

