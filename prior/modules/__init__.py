"""The three LightningModules of the pipeline (reference LM, weight scorer, LVLM)."""
