"""rewrite: horizontal splits as graph surgery (parts + combine), recorded as typed regions (`edgesplit.layout`).

`cnn/` holds the CNN family (channels, spatial tiles, fused runs; entry `edgesplit.rewrite.cnn.apply`); `base.py`
what every family shares (the request, share arithmetic, the model editor). Rewrites know no devices: which device
runs each part is decided in `edgesplit.place`.
"""
