"""pgmux.auth"""
