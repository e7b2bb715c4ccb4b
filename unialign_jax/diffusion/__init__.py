"""The two diffusion processes of UniAlignment, shared by training and sampling.

`flow`: rectified flow on image latents (SD3's scheduler, spec sections 4 and 5).
`masked`: masked discrete diffusion on caption tokens (MDLM with SUBS, sections 4 and 5).
Each owns its schedule, forward noising, loss and reverse step, and its constants.
"""
