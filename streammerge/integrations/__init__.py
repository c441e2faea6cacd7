"""Optional integrations with engines users already run: Ray (``ray``) and vLLM (``vllm``).

Each module imports its engine lazily and says what to install when it is missing; nothing in
the core package imports these modules.
"""
