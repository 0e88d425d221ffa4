"""pgmux.config"""
