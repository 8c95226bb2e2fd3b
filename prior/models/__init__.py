"""Models: language models, vision backbones and the LVLM."""
