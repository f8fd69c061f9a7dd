"""dsconvert test fixture stand-in for DeepSeek's configuration_deepseek.py. dsconvert must copy it and never run it."""
import pathlib
pathlib.Path(__file__).with_name('EXECUTED_configuration_deepseek').write_text('this file was executed')
