"""Attribution analysis of vision-language models, and the backbones and data everything else uses.

- `attrib.backbones`: backbones as data (`BackboneSpec`), loading local HF folders (`load_backbone`),
  building and converting models;
- `attrib.data`, `attrib.prompts`: MMEdit records (lazy images, one-line errors) and prompt formats;
- `attrib.contribution`: per-layer attention / MLP contributions to the answer token;
- `attrib.regions`: region maps by perturbation (one sweep, pluggable methods and region sets);
- `attrib.ceiling`, `attrib.placement`: the visual patching ceiling and where the editor goes;
- `attrib.attribution`: the pipeline and its artifact (``attribution.json`` + ``.safetensors``), figures;
- `attrib.validation`: region maps scored against the synthetic world's truth boxes;
- `attrib.world`: the synthetic visual world with ground truth; `attrib.defaults`: the shipped models.

`attrib` never imports `editing`.
"""
