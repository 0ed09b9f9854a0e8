"""The quantities training logs through dvclive (`ssr.train`: `live.log_metric`), in words.

Titles for the report's curves (`ssr.report`) and DVC's plots (workflow/pipeline.py writes them
into dvc.yaml). Standard library only: workflow/pipeline.py loads this file without the
package's dependencies.
"""

CURVES = {
    "train/loss": "L = L_proto + γ (L_ce + w_aff L_aff), the training loss (Eq. 12)",
    "train/loss_proto": "L_proto, the prototype loss (Eq. 6; a cmpa_* variant's own Table 4 loss)",
    "train/loss_ce": "L_ce, cross-entropy on the online pseudo-labels (L_seg)",
    "train/loss_aff": "L_aff, the decoder's affinity loss (WeCLIP)",
    "train/tau": "τ_proto, the learnable prototype temperature (Eq. 3)",
    "train/lr": "the learning rate",
}
