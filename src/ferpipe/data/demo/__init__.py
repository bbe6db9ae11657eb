"""A generated demo dataset: expression-warped faces, so the pipeline runs with no data at all.

templates: the identities (faces that ship with scikit-image), landmarked and aligned; expressions:
each class as a displacement field; render: one image (warp, shading, pose, photometry); images: the
image demo (make_demo); sequences: the CK+-layout demo sequences (make_demo_sequences).
"""
from ferpipe.data.demo.expressions import CLASSES, MAX_STRENGTH, displacement, expression_targets, rbf_weights
from ferpipe.data.demo.images import SPLITS, detection_rate, make_demo
from ferpipe.data.demo.sequences import SEQUENCE_CLASSES, make_demo_sequences
from ferpipe.data.demo.templates import load_templates
