"""`lorafit verify`: prove that an adapter is what users will run (lorafit.verify.run).

    compare    distances between next-token distributions, tolerances per kind of path
    local      the adapter on its base, the exact merge, the merge requantized to NF4, PEFT
    external   a GGUF in llama.cpp, a running OpenAI-compatible server
    targets    what vLLM, SGLang, llama.cpp and Ollama accept
    modelfile  an Ollama Modelfile from the adapter's prompt format
    run        the command: the table, the verdicts, the exit status
    args       its command line (the CLI's parser imports no more than this)
"""
