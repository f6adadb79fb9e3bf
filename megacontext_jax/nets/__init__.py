"""The networks (DESIGN section 7): the layers, the decoder interface, the GPT base model, the
imported Llama family and its weight I/O, GistNet, LensNet, and their typed configs."""
