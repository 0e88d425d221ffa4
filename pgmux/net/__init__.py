"""pgmux.net"""
