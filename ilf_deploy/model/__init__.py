"""The model side: family adapters, the ILF feedback module, loading diffusers pipelines, tiny models,
tokenizers, prompt data.
"""
