"""The backbone layer: specs as data, loading from local folders, input building, model building."""
from attrib.backbones.loader import Backbone, load_backbone, model_fingerprint
from attrib.backbones.processing import TemplateProcessor, locate_visual_tokens
from attrib.backbones.spec import IMAGE_PLACEHOLDER, SPECS, BackboneSpec, get_spec

__all__ = ["Backbone", "BackboneSpec", "IMAGE_PLACEHOLDER", "SPECS", "TemplateProcessor", "get_spec",
           "load_backbone", "locate_visual_tokens", "model_fingerprint"]
