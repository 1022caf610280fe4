"""A toy world where MasaCtrl's effect can be seen and measured (issue 13).

``world`` draws captioned scenes of a creature whose identity is mostly uncaptioned detail,
``measures`` scores identity consistency and pose compliance, ``train`` trains a small
Stable-Diffusion-family checkpoint on the scenes. Nothing here is imported by the engine.
"""
